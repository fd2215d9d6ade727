"""The application layer: the ``glue`` command line, above the flows and deployments it
starts (``flows`` and ``deployments`` never import it)."""
