"""Everything MLflow, one job per module.

- `store`: where runs go (the tracking URI), the driver's preflight, experiments, params.
- `sender`: the buffered sender thread, so the training step never waits for the server.
- `spill`: what the sender could not deliver, kept in the run's storage and delivered later.
- `run_logger`: rank 0's handle on one run, new or re-opened when training resumes.
- `registry`: G and D as registered models, aliases, and the one loader of trained networks.

The data layer imports none of this: a DataLoader process never loads MLflow.
"""
