"""The ``gpu_training`` DAG's params: one JSON schema per param, and the validated ``JobSpec``.

The same schemas feed Airflow's ``Param`` objects (trigger form, REST API validation) and
:func:`parse_job_params`, which the first task runs again so that a run created any other way is
still rejected, naming the param, before anything is provisioned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import jsonschema

from gpu_training.errors import JobParamsError


def whole(pattern: str) -> str:
    r"""A JSON-schema ``pattern`` that must match the whole value. JSON schema searches (Python's
    ``re.search``), and Python's ``$`` also matches before a final newline: the lookahead refuses a
    value ending in one, and the pattern means the same in ECMA-262 (which has no ``\Z``)."""
    return rf"^(?:{pattern})$(?!\n)"


PROVIDERS = ("local", "ssh", "lambda", "runpod", "vast", "ec2")
RUNTIMES = ("process", "docker")
DEFAULT_IMAGE = "gpu-trainer:latest"
# ``{python}`` and ``{workdir}`` are expanded on the instance (see ``render_command``).
DEFAULT_COMMAND = ["{python}", "{workdir}/trainer/train.py"]
_URI_PATTERN = whole(r"|(?:file|s3)://.+")
_SIZE_PATTERN = whole(r"|[0-9]+(?:\.[0-9]+)?[bkmgBKMG]?")
# A Docker image reference: never empty, never starting with '-' (it must not read as an option).
_IMAGE_PATTERN = whole(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}")

#: A ``notify`` target: ``smtp://<conn id>/<to>[,<to>...]``, ``slack://<conn id>``, ``webhook://<conn id>``.
NOTIFY_TARGET_PATTERN = whole(
    r"smtp://[A-Za-z0-9_.-]{1,250}/[^/\s,]+@[^/\s,]+(?:,[^/\s,]+@[^/\s,]+)*|(?:slack|webhook)://[A-Za-z0-9_.-]{1,250}"
)

#: The trigger form's sections, in order (Airflow's ``Param(section=...)``). The job's own params
#: have none: Airflow puts them in its default section ("Run Parameters"), the only one expanded
#: when the form opens, so what most people set is what they see first.
JOB = ""
WHERE = "Where it runs"
TRAINER = "Trainer"
DATA = "Data and outputs"
LIMITS = "Limits and budget"
NOTIFY = "Notifications"
SECTIONS = (JOB, WHERE, TRAINER, DATA, LIMITS, NOTIFY)

_CONN_ID_PATTERN = whole(r"|[A-Za-z0-9_.-]{1,250}")
_CONN_ID_WORDS = "an Airflow connection id: up to 250 letters, digits, '_', '.' or '-' (or empty)"
_URI_WORDS = "a file:// or s3:// URI (or empty)"
_SIZE_WORDS = "a size such as 512m, 32g or 1.5g (a number, then b, k, m or g), or empty"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One param of the DAG: its default, the JSON schema a value must match, and what the trigger
    form shows (title, description, section). ``allowed`` says in words what the schema allows (a
    refusal quotes it); without it the words are derived from the schema. Only ``required`` params
    must be filled in the form: every other one may be left empty and then takes its default."""

    default: Any
    schema: dict[str, Any]
    title: str
    description: str
    section: str
    allowed: str = ""
    required: bool = False
    values_display: dict[str, str] | None = None

    def allowed_words(self) -> str:
        return self.allowed or schema_words(self.schema)


# name -> ParamSpec. Order is the trigger form's order (sections in SECTIONS' order).
PARAM_SPECS: dict[str, ParamSpec] = {
    # --- the job ---------------------------------------------------------------------------------
    "project_id": ParamSpec(
        "demo",
        {"type": "string", "pattern": whole(r"[A-Za-z0-9_.-]{1,64}")},
        "Project",
        "Your project's name: 1-64 characters of letters, digits, '_', '.', '-'.",
        JOB,
        allowed="1 to 64 letters, digits, '_', '.' or '-'",
        required=True,
    ),
    "provider": ParamSpec(
        "local",
        {"type": "string", "enum": [*PROVIDERS, "cloud"]},
        "Provider",
        "Where the GPU comes from. 'local' runs on the Airflow worker itself, 'ssh' on your own box; "
        "'lambda', 'runpod', 'vast', 'ec2' rent one; 'cloud' takes the cheapest offer of `providers` "
        "(empty: every cloud with a connection).",
        JOB,
        values_display={
            "local": "local (the Airflow worker)",
            "ssh": "ssh (your own GPU box)",
            "lambda": "Lambda Cloud",
            "runpod": "RunPod",
            "vast": "Vast.ai",
            "ec2": "AWS EC2",
            "cloud": "cloud (the cheapest of several clouds)",
        },
    ),
    "config": ParamSpec(
        {},
        {"type": "object"},
        "Hyperparameters",
        "Object of hyperparameters, written into the job's YAML config under 'hyperparameters'.",
        JOB,
        allowed='a JSON object of hyperparameters, e.g. {"epochs": 5, "learning_rate": 0.01}',
    ),
    # --- where it runs ---------------------------------------------------------------------------
    "gpu": ParamSpec(
        "",
        {"type": "string", "maxLength": 64},
        "GPU",
        "GPU model and count, e.g. 'H100', 'A100:8' or '8xA100'; empty for any (the local provider has none).",
        WHERE,
        allowed="a GPU model and count such as H100, A100:8 or 8xA100 (at most 64 characters), or empty",
    ),
    "instance_type": ParamSpec(
        "",
        {"type": "string", "maxLength": 128},
        "Instance type",
        "An exact instance type (e.g. 'gpu_1x_a100', 'p4d.24xlarge'); empty to choose by GPU and price.",
        WHERE,
    ),
    "providers": ParamSpec(
        [],
        {"type": "array", "items": {"type": "string", "enum": list(PROVIDERS)}, "uniqueItems": True},
        "Providers to consider",
        "Clouds whose offers are compared, cheapest first, with failover on capacity errors; empty: just `provider` "
        "(or, with provider 'cloud', every cloud with a connection).",
        WHERE,
    ),
    "regions": ParamSpec(
        [],
        {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}},
        "Regions",
        "Allowed regions; empty for any.",
        WHERE,
        allowed="a list of region names (1 to 64 characters each), or empty",
    ),
    "max_price_per_hour": ParamSpec(
        0,
        {"type": "number", "minimum": 0},
        "Max price per hour (USD)",
        "No offer above this is launched; 0 for no cap. With no offer under it the job fails before "
        "launching and says what the cheapest was.",
        WHERE,
    ),
    "spot": ParamSpec(
        False,
        {"type": "boolean"},
        "Allow spot / interruptible",
        "Consider interruptible (spot) offers too.",
        WHERE,
    ),
    "max_recoveries": ParamSpec(
        2,
        {"type": "integer", "minimum": 0, "maximum": 20},
        "Max spot recoveries",
        "How many times a job whose spot / interruptible instance was interrupted is relaunched on a "
        "new offer, resuming from the last checkpoint synced to outputs_uri (s3://); then it fails.",
        WHERE,
    ),
    "num_nodes": ParamSpec(
        1,
        {"type": "integer", "minimum": 1, "maximum": 64},
        "Nodes",
        "Instances the job trains on together (data parallel, torchrun on each). All are launched from one "
        "offer in one region, all or nothing: if one cannot be had, the others are terminated and the next "
        "offer is tried. Node 0 writes global.json; one node failing fails the job; every node is torn down.",
        WHERE,
    ),
    "gpus_per_node": ParamSpec(
        0,
        {"type": "integer", "minimum": 0, "maximum": 64},
        "GPUs per node",
        "Trainer processes per node (torchrun --nproc-per-node); 0 for the offer's GPU count (1 where it has "
        "none, e.g. the local provider). Offers with fewer GPUs are not considered.",
        WHERE,
    ),
    "boot_timeout_minutes": ParamSpec(
        0,
        {"type": "number", "minimum": 0, "maximum": 1440},
        "Provisioning timeout (minutes)",
        "How long an instance may take from launch to answering SSH before it is terminated and the next "
        "offer tried; 0 for the provider's default (Lambda 30, RunPod 20, Vast.ai 20, EC2 10).",
        WHERE,
    ),
    "max_launch_attempts": ParamSpec(
        4,
        {"type": "integer", "minimum": 1, "maximum": 20},
        "Max launch attempts",
        "Instances a job may launch in all (capacity refusals, unhealthy or unreachable instances each use one).",
        WHERE,
    ),
    "ssh_conn_id": ParamSpec(
        "",
        {"type": "string", "pattern": _CONN_ID_PATTERN},
        "SSH connection",
        "Airflow SSH connection of your GPU host (provider 'ssh'). Host keys are verified.",
        WHERE,
        allowed=_CONN_ID_WORDS,
    ),
    # --- the trainer -----------------------------------------------------------------------------
    "runtime": ParamSpec(
        "process",
        {"type": "string", "enum": list(RUNTIMES)},
        "Runtime",
        "'process' runs `command` directly on the instance; 'docker' runs `image`.",
        TRAINER,
        values_display={"process": "process (run the command)", "docker": "docker (run the image)"},
    ),
    "image": ParamSpec(
        DEFAULT_IMAGE,
        {"type": "string", "pattern": _IMAGE_PATTERN},
        "Trainer image",
        "Docker image of the trainer (runtime 'docker'), e.g. registry.example.com:5000/team/trainer:1.4.",
        TRAINER,
        allowed="a Docker image reference such as registry.example.com:5000/team/trainer:1.4 (letters, digits, "
        "'.', '_', '/', ':', '@', '-'; not starting with '-')",
    ),
    "command": ParamSpec(
        DEFAULT_COMMAND,
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "Command",
        "The trainer command as a list of strings. '{python}' is the instance's Python, "
        "'{workdir}' the job's work directory; the default runs the reference trainer.",
        TRAINER,
        allowed="a list of at least one non-empty string (one per line in the form), e.g. "
        '["{python}", "{workdir}/trainer/train.py"]',
    ),
    "registry_conn_id": ParamSpec(
        "",
        {"type": "string", "pattern": _CONN_ID_PATTERN},
        "Registry connection",
        "Airflow connection with the image registry's host[:port], login and password (runtime 'docker'); "
        "empty for a public or already present image.",
        TRAINER,
        allowed=_CONN_ID_WORDS,
    ),
    "image_pull": ParamSpec(
        "missing",
        {"type": "string", "enum": ["missing", "always"]},
        "Image pull policy",
        "'missing' uses an image already on the host and pulls otherwise; 'always' pulls every run.",
        TRAINER,
    ),
    "container_memory": ParamSpec(
        "",
        {"type": "string", "pattern": _SIZE_PATTERN},
        "Container memory limit",
        "Docker memory limit, e.g. '32g' (runtime 'docker'); empty for none. Exceeding it ends the "
        "job as out of memory (exit 137).",
        TRAINER,
        allowed=_SIZE_WORDS,
    ),
    "container_cpus": ParamSpec(
        0,
        {"type": "number", "minimum": 0, "maximum": 1024},
        "Container CPUs",
        "Docker CPU limit (runtime 'docker'); 0 for none.",
        TRAINER,
    ),
    "container_shm_size": ParamSpec(
        "1g",
        {"type": "string", "pattern": _SIZE_PATTERN},
        "Container /dev/shm size",
        "Shared memory for data loader workers (runtime 'docker'); empty for Docker's default (64 MB).",
        TRAINER,
        allowed=_SIZE_WORDS,
    ),
    # --- data and outputs ------------------------------------------------------------------------
    "dataset_uri": ParamSpec(
        "",
        {"type": "string", "pattern": _URI_PATTERN},
        "Dataset URI",
        "file:// or s3:// file or prefix holding the training data; empty for the bundled data.",
        DATA,
        allowed=_URI_WORDS,
    ),
    "init_checkpoint_uri": ParamSpec(
        "",
        {"type": "string", "pattern": _URI_PATTERN},
        "Initial checkpoint URI",
        "file:// or s3:// model checkpoint the trainer starts from (the reference trainer: a model .npz); it "
        "lands in the work directory's init/ and the config names it as init_checkpoint_path. Pipeline "
        "stages get the previous stage's model here.",
        DATA,
        allowed=_URI_WORDS,
    ),
    "outputs_uri": ParamSpec(
        "",
        {"type": "string", "pattern": _URI_PATTERN},
        "Outputs URI",
        "file:// or s3:// prefix for outputs; each job writes under <outputs_uri>/<job uuid>/. "
        "Empty: the embedded storage.",
        DATA,
        allowed=_URI_WORDS,
    ),
    "aws_conn_id": ParamSpec(
        "aws_default",
        {"type": "string", "pattern": whole(r"[A-Za-z0-9_.-]{1,250}")},
        "AWS connection",
        "Airflow AWS connection for every s3:// URI of the job and for provider 'ec2' (credentials, region, "
        "endpoint_url).",
        DATA,
        allowed="an Airflow connection id: 1 to 250 letters, digits, '_', '.' or '-'",
    ),
    "s3_transfer": ParamSpec(
        "direct",
        {"type": "string", "enum": ["direct", "relay"]},
        "S3 transfer",
        "'direct': a remote instance pulls an s3:// dataset and pushes outputs itself through presigned "
        "URLs, verified by SHA256, and nothing passes through the Airflow worker; 'relay': through the "
        "worker (for storage the instance cannot reach).",
        DATA,
    ),
    "presigned_url_expiry_minutes": ParamSpec(
        60,
        {"type": "number", "minimum": 1, "maximum": 7 * 24 * 60},
        "Presigned URL expiry (minutes)",
        "How long the presigned URLs handed to the instance stay valid (S3 allows up to 7 days).",
        DATA,
    ),
    # --- limits and budget -----------------------------------------------------------------------
    "max_runtime_minutes": ParamSpec(
        120,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 60 * 24 * 14},
        "Max runtime (minutes)",
        "The trainer is stopped and the job failed after this long.",
        LIMITS,
    ),
    "max_cost_usd": ParamSpec(
        0,
        {"type": "number", "minimum": 0, "maximum": 1_000_000},
        "Max cost (USD)",
        "Hard limit on what the job's instances may cost in all (price per hour x time, every instance "
        "of the job, launch to termination): reached while booting or training, the job is stopped and "
        "torn down; no instance is launched once it is spent. 0 for no limit.",
        LIMITS,
    ),
    "run_budget_usd": ParamSpec(
        0,
        {"type": "number", "minimum": 0, "maximum": 1_000_000},
        "Run budget (USD)",
        "What all the jobs of this DAG run (a sweep's trials, a pipeline's stages) may cost together: once "
        "spent, no further instance is launched and a job not yet launched is cancelled. 0 for no budget.",
        LIMITS,
    ),
    "run_max_instances": ParamSpec(
        0,
        {"type": "integer", "minimum": 0, "maximum": 1000},
        "Run max instances",
        "At most this many jobs of this DAG run (a sweep's trials, a pipeline's parallel stages) hold an "
        "instance at once, launch to verified termination; a job waits for a slot holding no worker or "
        "pool slot. 0 for no limit.",
        LIMITS,
    ),
    "stall_timeout_minutes": ParamSpec(
        15,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 60 * 24},
        "Stall timeout (minutes)",
        "The job fails as stalled when global.json gets no new bytes for this long.",
        LIMITS,
    ),
    "unreachable_timeout_minutes": ParamSpec(
        2,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 24 * 60},
        "Unreachable timeout (minutes)",
        "The job fails when its host does not answer for this long while training.",
        LIMITS,
    ),
    "stop_on_nan": ParamSpec(
        False,
        {"type": "boolean"},
        "Stop on NaN loss",
        "Stop the job (failed) at the first NaN or infinite loss in global.json; otherwise it is "
        "recorded on the job and training goes on.",
        LIMITS,
    ),
    "poll_interval_seconds": ParamSpec(
        5,
        {"type": "number", "minimum": 0.5, "maximum": 3600},
        "Poll interval (seconds)",
        "How often the trainer's status is checked (and global.json polled when its stream is "
        "broken); new events themselves are streamed as they are written.",
        LIMITS,
    ),
    # --- notifications ---------------------------------------------------------------------------
    "notify": ParamSpec(
        [],
        {"type": "array", "items": {"type": "string", "pattern": NOTIFY_TARGET_PATTERN}, "uniqueItems": True},
        "Notify",
        "Where to say that the job completed, failed (with the reason) or was cancelled: "
        "'smtp://<connection>/<to>[,<to>...]' (e-mail through an SMTP connection), "
        "'slack://<connection>' (a Slack incoming webhook connection), 'webhook://<connection>' (a JSON POST "
        "to the connection's URL). Secrets stay in the connections; a notifier that fails never fails the job.",
        NOTIFY,
        allowed="a list of targets, one per line: 'smtp://<connection>/<to>[,<to>...]', 'slack://<connection>' "
        "or 'webhook://<connection>'",
    ),
    "notify_every_epochs": ParamSpec(
        0,
        {"type": "integer", "minimum": 0, "maximum": 100_000},
        "Progress every N epochs",
        "Also notify the `notify` targets of progress (epoch, loss, evaluation) every N epochs; 0 for none.",
        NOTIFY,
    ),
}


_TYPE_WORDS = {
    "string": "a text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a JSON object",
    "array": "a list",
}


def schema_words(schema: Mapping[str, Any]) -> str:
    """What a (simple) JSON schema allows, in words: ``a whole number from 0 to 20``."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"] if v is not None)
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items") or {}
        if "enum" in items:
            return "a list of " + ", ".join(repr(v) for v in items["enum"]) + " (each at most once)"
        return "a list of " + schema_words(items).removeprefix("a ") + "s"
    words = _TYPE_WORDS.get(str(kind), "a value")
    low = schema.get("minimum")
    above = schema.get("exclusiveMinimum")
    high = schema.get("maximum")
    if low is not None and high is not None:
        return f"{words} from {low:g} to {high:g}"
    parts = []
    if low is not None:
        parts.append(f"at least {low:g}")
    if above is not None:
        parts.append(f"greater than {above:g}")
    if high is not None:
        parts.append(f"at most {high:g}")
    if "maxLength" in schema:
        parts.append(f"at most {schema['maxLength']} characters")
    return words + (" " + ", ".join(parts) if parts else "")


def shown(value: Any, limit: int = 80) -> str:
    """A value as a refusal quotes it: short, and without a trailing newline left invisible."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refusal(name: str, value: Any) -> str:
    """Why ``value`` is refused for param ``name``, naming its title and what is allowed, in words."""
    spec = PARAM_SPECS[name]
    return f"{spec.title} ({name}): {shown(value)} is not allowed: {spec.allowed_words()}"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A validated training job request: the DAG run's params after schema checks."""

    project_id: str
    provider: str = "local"
    gpu: str = ""
    instance_type: str = ""
    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    max_price_per_hour: float = 0
    spot: bool = False
    max_recoveries: int = 2
    boot_timeout_minutes: float = 0
    num_nodes: int = 1
    gpus_per_node: int = 0
    max_launch_attempts: int = 4
    runtime: str = "process"
    ssh_conn_id: str = ""
    image: str = DEFAULT_IMAGE
    registry_conn_id: str = ""
    image_pull: str = "missing"
    container_memory: str = ""
    container_cpus: float = 0
    container_shm_size: str = "1g"
    command: tuple[str, ...] = tuple(DEFAULT_COMMAND)
    dataset_uri: str = ""
    init_checkpoint_uri: str = ""
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    outputs_uri: str = ""
    aws_conn_id: str = "aws_default"
    s3_transfer: str = "direct"
    presigned_url_expiry_minutes: float = 60
    max_cost_usd: float = 0
    run_budget_usd: float = 0
    run_max_instances: int = 0
    max_runtime_minutes: float = 120
    stall_timeout_minutes: float = 15
    poll_interval_seconds: float = 5
    stop_on_nan: bool = False
    unreachable_timeout_minutes: float = 2
    notify: tuple[str, ...] = ()
    notify_every_epochs: int = 0

    @property
    def distributed(self) -> bool:
        """Several nodes, or several trainer processes per node: the trainer runs under torchrun."""
        return self.num_nodes > 1 or self.gpus_per_node > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored on the job row."""
        out = dataclasses.asdict(self)
        out["command"] = list(self.command)
        out["providers"] = list(self.providers)
        out["regions"] = list(self.regions)
        out["notify"] = list(self.notify)
        out["config"] = dict(self.config)
        return out


#: A key in the schema of each of our params (JSON schema ignores unknown keywords): the api-server's
#: refusal of a trigger is explained in words for these (``gpu_training.api.param_refusals``).
PARAM_MARKER = "x-gpu-training-param"
#: The JSON schema dialect of every param's schema. Airflow checks a param's schema against its
#: dialect's metaschema each time it resolves the param, and serializing a DAG resolves every
#: task's params twice: the default dialect (2020-12) costs 13 ms for the 39 params here, draft-07
#: 5.5 ms (``bench/params.py``). The schemas use nothing newer than draft-07.
SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
_UNSET: Any = object()


def form_schema(name: str) -> dict[str, Any]:
    """The JSON schema Airflow's trigger form and REST API check ``name`` against: the value schema,
    with ``null`` allowed for optional params (the form leaves them empty; the default applies)."""
    spec = PARAM_SPECS[name]
    schema = {"$schema": SCHEMA_DIALECT, **spec.schema, PARAM_MARKER: name}
    if spec.section:
        schema["section"] = spec.section
    if not spec.required:
        schema["type"] = [spec.schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    display = dict(spec.values_display or {})
    if "enum" in spec.schema and not spec.required:
        display["null"] = f"(default: {spec.default})"
    if display:
        schema["values_display"] = display
    if spec.schema.get("type") == "array" and "enum" in spec.schema.get("items", {}):
        # A multi-select of the allowed values instead of free text lines.
        schema["examples"] = list(spec.schema["items"]["enum"])
    return schema


def airflow_param(name: str, default: Any = _UNSET) -> Any:
    """The Airflow ``Param`` of ``name`` (its default, or ``default``): title, description,
    section and schema for the trigger form and the REST API's validation."""
    from airflow.sdk import Param

    spec = PARAM_SPECS[name]
    value = spec.default if default is _UNSET else default
    if value == "" and not spec.required:
        value = None  # an optional text left empty: the form shows an empty, optional field
    return Param(value, title=spec.title, description=spec.description, **form_schema(name))


def airflow_params() -> dict[str, Any]:
    """The DAG's ``params``: Airflow ``Param`` objects built from :data:`PARAM_SPECS`."""
    return {name: airflow_param(name) for name in PARAM_SPECS}


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (a number, or one inside a list or an object)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    """``name``'s value schema as a validator, its schema checked once (``jsonschema.validate``
    checks it at every call: most of the cost of a call)."""
    schema = PARAM_SPECS[name].schema
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def parse_job_params(params: Mapping[str, Any]) -> JobSpec:
    """Validate raw params (defaults filled for missing or null ones) and return a :class:`JobSpec`.

    Raises :class:`JobParamsError` naming the first bad param, its title and what it allows. Unknown
    params are ignored so that later additions to the DAG do not break older callers.
    """
    values: dict[str, Any] = {}
    for name, spec in PARAM_SPECS.items():
        value = params.get(name, spec.default)
        if value is None:
            value = spec.default
        try:
            if (error := jsonschema.exceptions.best_match(_validator(name).iter_errors(value))) is not None:
                raise error
            if not _finite(value):  # NaN passes minimum and maximum, and JSON (the results DB) has none
                raise jsonschema.ValidationError("not a finite number")
        except jsonschema.ValidationError:
            raise refused(name, f"{shown(value)} is not allowed: {spec.allowed_words()}") from None
        values[name] = value
    if values["runtime"] == "process" and not any(part.strip() for part in values["command"]):
        raise refused("command", "must contain a program to run")
    if values["provider"] == "ssh" and not values["ssh_conn_id"]:
        raise refused("ssh_conn_id", "is required when provider is 'ssh'")
    if values["num_nodes"] > 1 and values["provider"] == "ssh":
        raise refused(
            "num_nodes", "provider 'ssh' is one host; a multi-node job needs a provider that launches instances"
        )
    if values["num_nodes"] > 1 and values["runtime"] == "docker":
        raise refused(
            "num_nodes", "multi-node jobs run the trainer as a process (runtime 'process', torchrun on each node)"
        )
    values["command"] = tuple(values["command"])
    values["notify"] = tuple(values["notify"])
    values["providers"] = tuple(values["providers"])
    values["regions"] = tuple(values["regions"])
    from gpu_training.offers import parse_gpu

    try:
        parse_gpu(values["gpu"])  # a bad GPU request is refused here, naming the param
    except JobParamsError as err:
        raise refused(err.param, err.reason) from None
    return JobSpec(**values)


def param_title(param: str) -> str | None:
    """The param's title in the trigger form (the field people see), if it is one of ours."""
    spec = PARAM_SPECS.get(param)
    return spec.title if spec is not None else None


def refused(param: str, message: str) -> JobParamsError:
    """The refusal of ``param``, naming its title in the trigger form."""
    return JobParamsError(param, message, title=param_title(param))


def render_command(command: tuple[str, ...] | list[str], *, python: str, workdir: str) -> list[str]:
    """Expand the ``{python}`` and ``{workdir}`` placeholders; nothing else is interpreted."""
    return [part.replace("{python}", python).replace("{workdir}", workdir) for part in command]
