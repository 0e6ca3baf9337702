"""Templates and defaults the circus ``.ini`` generator renders (package data: ``*.ini``, ``*.tmpl``, ``*.yaml``)."""
