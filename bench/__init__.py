"""Speed and quality measurements that print ratios. Run each as a module from the repository
root, e.g. ``python -m bench.step_overhead`` (``make bench`` runs the quick ones)."""
