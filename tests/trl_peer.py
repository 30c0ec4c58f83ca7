"""What the TRL equality tests share: one training run of a TRL trainer on one thread, with the
batches it scored captured on their way into its compute_loss."""

import torch


def train_capturing_batches(trainer) -> list[dict]:
    """Train `trainer` (one thread: results do not depend on the core count) and return every
    batch its compute_loss received, tensors only, detached copies."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    batches, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = spy
    try:
        trainer.train()
    finally:
        torch.set_num_threads(before)
    return batches
