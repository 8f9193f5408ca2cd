"""The Lightning system: ``LitSuperCLIP`` (``module``) and what it alone uses: negatives across
accumulated micro-batches (``accumulation``), the optimizer and schedule (``optim``), FSDP2 sharding
(``sharding``), FLOPs of a step (``flops``) and an exact resume (``resume``)."""
