"""Version checks with upgrade messages for the integrations.

The ranges below are the ones the test suite ran with (requirements.txt and requirements-test.txt install them).
A version below the minimum lacks an API the code calls; a version above the tested
maximum is allowed (with no warning) because these libraries mostly keep compatibility,
but it has not been tested.
"""

from importlib import metadata

from packaging.version import Version

# package -> (minimum that has every API we call, why)
MINIMUM = {
    "transformers": ("4.46", "Trainer.compute_loss(num_items_in_batch=...) (transformers 4.46)"),
    "trl": ("1.7", "GKDTrainer passing num_items_in_batch to generalized_jsd_loss (TRL 1.7, huggingface/trl#6006; "
                   "older releases normalise each micro-batch on its own under gradient accumulation)"),
    "accelerate": ("1.0", "Accelerator(gradient_accumulation_steps=...) with accumulate() and DeepSpeed gradient "
                          "accumulation boundaries (accelerate 1.0)"),
    "peft": ("0.13", "PeftModel.from_pretrained / get_peft_model as used by csd-distill"),
}

# What the test suite was run with (the newest releases we know work).
TESTED = {"transformers": "5.24", "trl": "1.16", "accelerate": "1.16", "peft": "0.21", "datasets": "5.2"}


def installed_version(package):
    try:
        return Version(metadata.version(package))
    except metadata.PackageNotFoundError:
        return None


def require(package, feature=None):
    """Raise ImportError naming the package, the version found and what to run, when ``package``
    is missing or older than its minimum."""
    minimum, why = MINIMUM[package]
    found = installed_version(package)
    what = feature or why
    if found is None:
        raise ImportError(f"{what} needs {package} >= {minimum}, which is not installed: "
                          f"pip install '{package}>={minimum}' (tested with {TESTED.get(package, minimum)})")
    if found < Version(minimum):
        raise ImportError(f"{what} needs {package} >= {minimum}, found {found}: "
                          f"pip install -U '{package}>={minimum}' (tested with {TESTED.get(package, minimum)})")
    return found
