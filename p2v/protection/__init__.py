"""Protection: register machines at a DR site, seed them, sync recovery points, verify them.

This package joins the site (:mod:`p2v.site`: catalog, chains, locks, retention) with the
replication sources (:mod:`p2v.replication`); the CLI and the Ansible modules call it.
"""
