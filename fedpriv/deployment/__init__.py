"""Real multi-machine deployment on Flower's deployment engine (SuperLink + one SuperNode per hospital).

* :mod:`fedpriv.deployment.credentials`: the CA, the server's TLS certificate, and each hospital's
  SuperNode authentication key pair and TLS client certificate;
* :mod:`fedpriv.deployment.proxy`: the nginx configuration in front of the SuperLink (mutual TLS,
  only the Fleet API forwarded; the SuperLink itself listens on loopback);
* :mod:`fedpriv.deployment.client_tls`: `fedpriv-supernode`, Flower's SuperNode presenting the
  hospital's TLS client certificate;
* :mod:`fedpriv.deployment.node`: :func:`~fedpriv.deployment.node.deployed_site`, a hospital built
  from its own SuperNode's node config (data, budget, delta, ledger never come from the server);
* :mod:`fedpriv.deployment.processes`: the exact Flower 1.42 command lines, and processes owned and
  stopped by PID;
* :mod:`fedpriv.deployment.rehearsal`: the whole deployment (SuperLink, proxy, SuperNodes) on one machine.

See docs/deployment.md and the `fedpriv-deploy` command (fedpriv.cli.deploy).
"""
