"""Default method parameters, in one light module shared by the library and the CLI.

The purification values were picked on MNIST timm / transformers models (docs/purification.md);
docs/benchmarks.md has the wider study.
"""

__all__ = ["DEMO", "PURIFY", "VERIFY", "ZOO_ARCHS", "ZOO_ATTACKS"]

#: The input-space search of the audit. Up to ``all_up_to`` classes every class is searched; above
#: it, the ``top`` classes the latent rule ranks most suspicious, so that its cost (``classes x
#: images`` images a step) does not grow with C. The calibration's thresholds are measured with
#: ``images`` reference images.
VERIFY: dict[str, int] = {"all_up_to": 32, "top": 12, "images": 40}

PURIFY: dict[str, float | int | str] = {
    "beta": 10.0,  # weight of CE(head(h + scale * s_t), y)
    "scale": 2.0,  # s_t multiplier; 1 is the paper
    "distill": 3.0,  # KL to the original model's clean predictions; 0 is the paper
    "keep": 10.0,  # KL to them over the non-target classes only; 0 is the earlier loss
    "lr": 0.003,
    "epochs": 10,  # or more: see min_steps
    "min_steps": 100,  # epochs=None runs max(epochs, enough epochs for this many optimizer steps)
    "warmup": 0.0,  # share of the epochs over which scale * s_t grows from 0; 0 is the paper
    "target_weight": 1.0,  # clean-CE weight of the target class's own samples; 1 is the paper
    "train": "backbone",  # the linear head stays as it is; "all" trains it too
    "augment": False,  # random 2-pixel shifts and flips of the fine-tuning images
    "sam_rho": 0.0,  # > 0: sharpness-aware minimisation (FT-SAM's optimiser); 0 is plain SGD
    "sam_adaptive": False,  # with sam_rho: adaptive SAM, the variant FT-SAM runs
    # CPU threads the fine-tuning runs at, whatever torch's setting: a CPU backward pass reduces
    # in a thread-dependent order, so a fixed count makes the weights repeatable; one thread never
    # oversubscribes a small or shared machine
    "threads": 1,
}

#: The ``demo`` command's model: its architecture, training epochs and seed.
DEMO: dict[str, int | str] = {"arch": "timm-test-resnet", "epochs": 8, "seed": 0}

#: The names of :data:`hub_backdoor.zoo.MODELS` and :data:`hub_backdoor.zoo.ATTACKS`, here so that
#: the command line lists them without importing torch.
ZOO_ARCHS: tuple[str, ...] = ("timm-test-resnet", "transformers-resnet")
ZOO_ATTACKS: tuple[str, ...] = ("badnets", "blend", "sig")
