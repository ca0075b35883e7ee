"""What the distribution tells Airflow about itself: the ``apache_airflow_provider`` entry point.

Airflow's providers manager calls :func:`get_provider_info` in every process that discovers providers
and validates the answer against ``airflow/provider_info.schema.json``: the hooks, the clouds'
connection types with their forms (``hooks/connection_types.py``), the ``[gpu_training]``
configuration section (``policy.py``'s options, so ``airflow config list`` shows them with their
defaults) and the plugin. Kept cheap: it imports no hook, Airflow or third-party module.
"""

from __future__ import annotations

from typing import Any

from gpu_training import DISTRIBUTION, __version__
from gpu_training.hooks.connection_types import CLOUD_CONNECTION_TYPES
from gpu_training.policy import OPTIONS, SECTION

NAME = "GPU training orchestrator"
#: The plugin: its name (``GpuTrainingPlugin.name``) and class.
PLUGIN_NAME = "gpu_training"
PLUGIN_CLASS = "gpu_training.plugin.GpuTrainingPlugin"
INTEGRATION = "GPU training"


def config_section() -> dict[str, Any]:
    """The ``[gpu_training]`` section as Airflow's configuration reference describes a section."""
    return {
        "description": "What a triggered training job may reach: providers, commands, files, connections, "
        "images, and how many metric rows it may store. Owned by whoever runs Airflow (docs/security.md).",
        "options": {
            key: {
                "description": option.description,
                "version_added": "0.1.0",
                "type": option.type,
                "example": option.example,
                "default": option.default,
            }
            for key, option in OPTIONS.items()
        },
    }


def get_provider_info() -> dict[str, Any]:
    """The provider info of the ``gpu-training-orchestrator`` distribution."""
    return {
        "package-name": DISTRIBUTION,
        "name": NAME,
        "description": "Trains models on rented or owned GPUs (Lambda Cloud, RunPod, Vast.ai, EC2, SSH, local) "
        "from Airflow: the cheapest fitting offer, live metrics in a results database, its REST API and "
        "Training jobs page.",
        "versions": [__version__],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["ml", "compute"]}],
        "hooks": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "gpu_training.hooks.lambda_cloud",
                    "gpu_training.hooks.runpod",
                    "gpu_training.hooks.vast",
                    "gpu_training.hooks.ec2",
                    "gpu_training.hooks.ec2_pricing",
                    "gpu_training.hooks.results",
                ],
            }
        ],
        "operators": [{"integration-name": INTEGRATION, "python-modules": ["gpu_training.operators"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["gpu_training.triggers"]}],
        "connection-types": [conn_type.provider_info() for conn_type in CLOUD_CONNECTION_TYPES],
        "config": {SECTION: config_section()},
        "plugins": [{"name": PLUGIN_NAME, "plugin-class": PLUGIN_CLASS}],
    }
