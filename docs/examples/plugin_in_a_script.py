"""The smallest plugin: an object with one hook implementation, in the script itself."""

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model


# --8<-- [start:plugin]
class PrintValLoss:
    @hookimpl
    def on_train_epoch_end(self, trainer):
        print(f"epoch {trainer.current_epoch}: val_loss {trainer.metrics['val_loss']:.3f}")


trainer = Trainer(plugins=[PrintValLoss()], max_epochs=3)
# --8<-- [end:plugin]

import torch  # noqa: E402  (the lines above are what the docs show)
import torch.nn.functional as F  # noqa: E402

train_loader, val_loader = make_data()
trainer.fit(
    make_model(),
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
