"""The life of deferred and realtime work: packing, submitting, polling, reconciling, rescue,
realtime calls, cancelling, purging, and the scheduler tick that runs them."""
