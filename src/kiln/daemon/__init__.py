"""The kiln daemon: one per KILN_HOME, supervising instances and the router."""
