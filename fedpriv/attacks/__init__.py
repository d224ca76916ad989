"""Privacy attacks that audit fedpriv, and the ceiling differential privacy puts on them.

Modules (import them directly; this package stays light because :mod:`fedpriv.config` imports
:mod:`fedpriv.attacks.settings`):

* :mod:`~fedpriv.attacks.inversion`: gradient inversion of one update (Geiping et al. 2020).
* :mod:`~fedpriv.attacks.membership`: loss-threshold and offline LiRA membership inference.
* :mod:`~fedpriv.attacks.bounds`: the (epsilon, delta) / accountant ceiling on any membership test,
  and a Clopper-Pearson check of an attack against it.
* :mod:`~fedpriv.attacks.audit`: :func:`~fedpriv.attacks.audit.run_audit`, both attacks at several
  privacy levels; :mod:`~fedpriv.attacks.report` and :mod:`~fedpriv.attacks.figures` write it out.
* :mod:`~fedpriv.attacks.settings`: the `audit` section of the config.

The command line is ``fedpriv-audit`` (:mod:`fedpriv.cli.audit`); see docs/audit.md.
"""
