"""One script for one process and for many.

    python docs/examples/distributed_train.py
    torchrun --standalone --nproc_per_node 2 docs/examples/distributed_train.py
    accelerate launch --multi_gpu --num_processes 2 docs/examples/distributed_train.py
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 \
        docs/examples/distributed_train.py

On a machine without a GPU the launched runs train on the CPU over gloo.
"""

import torch
import torch.nn.functional as F

import hooktrain
from hooktrain.testing import make_data, make_model


def main() -> None:
    # --8<-- [start:fit]
    trainer = hooktrain.Trainer(
        # mixed_precision is left to the launcher (accelerate launch --mixed_precision);
        # pass ("accelerate", {"mixed_precision": "bf16"}) to fix it in the script.
        plugins=["tqdm", "accelerate"],
        max_epochs=2,
        seed=0,
    )
    # 16 samples per process and batch: the global batch is 16 x the processes.
    train, val = make_data(n=256, batch_size=16)
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        metrics={"acc": hooktrain.accuracy},
    )
    if trainer.is_global_zero:  # one line, not one per process
        print(
            f"{trainer.world_size} process(es): val_loss={trainer.metrics['val_loss']:.4f} "
            f"val_acc={trainer.metrics['val_acc']:.3f}"
        )
    # --8<-- [end:fit]


if __name__ == "__main__":
    main()
