"""Networks the reward models run, reimplemented with their checkpoints' parameter names:
``arcface`` (insightface arcface_torch IResNet, the ``identity`` reward and ``deg``) and ``awing``
(the AWing FAN landmark detector, the ``lmd`` reward)."""
