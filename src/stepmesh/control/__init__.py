"""The control plane: the scheduler, membership (registration, address books, barriers, liveness), and UCX set-up."""
