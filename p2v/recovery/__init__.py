"""Recovery at the DR site: recovery points booted as DR VMs, production sources, fallback.

- :mod:`p2v.recovery.drvm`: prepare (pin, overlays, convert in place), boot, stop and
  discard a recovery VM started from a recovery point;
- :mod:`p2v.recovery.sources`: whether a protected source still answers, and stopping it;
- the fallback modules: what changed at DR and how it goes back to production.

Modules are imported by name (``from p2v.recovery.drvm import prepare_recovery_vm``): this
package imports nothing itself, so using one part does not load the others.
"""
