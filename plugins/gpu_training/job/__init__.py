"""The steps of a training job, one module per stage; :mod:`gpu_training.lifecycle` re-exports them.

``context`` (the job as a step sees it, loaded once per step), ``nodes`` (its instances and their
hosts), ``budget`` (cost, max cost, the run's budget and instance slots), ``register`` (job row,
config), ``provision`` (launch and failover), ``readiness`` (boot wait, replacing a broken
instance), ``start`` (inputs, the trainer, distributed start), ``following`` (what the trigger
needs, stopping the trainer after), ``recovery`` (spot interruptions), ``outputs`` (upload,
salvage of a cancelled job), ``terminate`` (terminate until gone, settle cost), ``teardown``
(teardown and the final status).
"""
