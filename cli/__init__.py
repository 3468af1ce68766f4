"""The ``gpas-probe`` command line (installed as ``gpas_probe.cli``): thin commands over the library."""
