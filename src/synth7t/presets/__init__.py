"""Packaged training presets (``tiny``, ``unc``, ``biofinder``, ``gan``): YAML files read by :mod:`synth7t.config`."""
