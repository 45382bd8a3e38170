"""brainseg-ray: Ray-distributed segmentation of FLAIR abnormalities in brain MRI slices."""

import os

# Nothing may reach the internet at run time. Every process that does our work (driver, Ray
# workers, Serve replicas, pytest) imports this package first, so the defaults are set here once.
for _name, _value in {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for updates at import
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",  # boto would probe 169.254.169.254 for credentials
    # Ray Train's print patch logs every worker print a second time; print once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
