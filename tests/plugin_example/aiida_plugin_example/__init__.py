"""An example AiiDA plugin: a work chain and a calcfunction, no calculation job."""
