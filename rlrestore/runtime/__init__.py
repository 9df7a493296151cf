"""Runtime helpers every layer may use: seeds, batch plans, learning-rate schedules, device rules
and numerics. Part of the core: nothing here imports the actor roles or the orchestration."""
