"""Response models of the results API (pydantic), built from the results DB's rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpu_training.results.models import Artifact, EpochTrain, Eval, Instance, TrainingJob, TrainingStep


class Job(BaseModel):
    """One training job: one run of the ``gpu_training`` DAG (or one mapped job of a sweep)."""

    uuid: str
    project_id: str
    dag_id: str
    run_id: str
    stage: str = Field(description="the pipeline stage (its task group) of a multi-stage run; empty for a single job")
    status: str = Field(description="pending, provisioning, running, completed, failed or cancelled")
    provider: str
    runtime: str
    gpu: str | None = Field(description="the `gpu` param of the job (empty: chosen by price)")
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    time_taken: float | None = Field(description="seconds")
    cost_usd: float | None
    failure_reason: str | None
    non_finite_loss: str | None = Field(description="the first NaN/infinite loss reported, if any")
    trainer_exit_code: int | None
    ingest_offset: int = Field(description="bytes of global.json stored so far")
    map_index: int = Field(description="the trial's map index in a sweep (its mapped task group); -1 when not mapped")
    updated_at: datetime | None = Field(description="when the job's row last changed")
    cancel_requested_at: datetime | None = Field(description="when a cancel was asked for (the job is cancelled then)")
    cancelled_by: str | None = Field(
        description="who cancelled the job: a user's name, or why (e.g. a run budget spent); null when not cancelled"
    )

    @classmethod
    def of(cls, job: TrainingJob) -> Job:
        return cls(
            uuid=job.uuid,
            project_id=job.project_id,
            dag_id=job.dag_id,
            run_id=job.run_id,
            stage=job.stage,
            status=job.status,
            provider=job.provider,
            runtime=job.runtime,
            gpu=job_gpu(job.params),
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            time_taken=job.time_taken,
            cost_usd=job.cost_usd,
            failure_reason=job.failure_reason,
            non_finite_loss=job.non_finite_loss,
            trainer_exit_code=job.trainer_exit_code,
            ingest_offset=job.ingest_offset,
            map_index=job.map_index,
            updated_at=job.updated_at,
            cancel_requested_at=job.cancel_requested_at,
            cancelled_by=job.cancelled_by,
        )


def job_gpu(params: dict[str, Any] | None) -> str | None:
    """The ``gpu`` field of a job: its ``gpu`` param, None when empty."""
    gpu = (params or {}).get("gpu")
    return str(gpu) if gpu else None


class JobList(BaseModel):
    jobs: list[Job]
    total: int = Field(description="jobs matching the filters (that the user may read)")
    limit: int
    offset: int


class Step(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step_type: str = Field(description="traj_gen, training or evaluation")
    config: dict[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None
    duration: float | None

    @classmethod
    def of(cls, row: TrainingStep) -> Step:
        return cls.model_validate(row)


class Epoch(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    iteration: int
    epoch: int
    avg_loss: float | None
    model_path: str | None
    optimizer_path: str | None
    metrics: dict[str, Any] | None
    completed_at: datetime

    @classmethod
    def of(cls, row: EpochTrain) -> Epoch:
        return cls.model_validate(row)


def model_id(job_uuid: str, iteration: int, epoch: int) -> str:
    """The id of the checkpoint an evaluation evaluated (see :mod:`gpu_training.api.queries`)."""
    return f"{job_uuid}/{iteration}/{epoch}"


class Evaluation(BaseModel):
    id: int
    model_id: str = Field(
        description='"{job_uuid}/{iteration}/{epoch}": the checkpoint evaluated (epoch 0: none named)'
    )
    job_uuid: str
    iteration: int
    epoch: int
    accuracy: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    auc: float | None
    loss: float | None
    confusion_matrix: list[list[int]] | None
    model_path: str | None
    metrics: dict[str, Any] | None
    evaluated_at: datetime

    @classmethod
    def of(cls, row: Eval, job_uuid: str) -> Evaluation:
        return cls(
            id=row.id,
            model_id=model_id(job_uuid, row.iteration, row.epoch),
            job_uuid=job_uuid,
            iteration=row.iteration,
            epoch=row.epoch,
            accuracy=row.accuracy,
            precision=row.precision,
            recall=row.recall,
            f1=row.f1,
            auc=row.auc,
            loss=row.loss,
            confusion_matrix=row.confusion_matrix,
            model_path=row.model_path,
            metrics=row.metrics,
            evaluated_at=row.evaluated_at,
        )


class EvaluationList(BaseModel):
    evaluations: list[Evaluation]
    limit: int
    offset: int
    total: int | None = Field(
        None, description="evaluations of the model id (null without one: the latest of every job are not counted)"
    )


class EvaluationPage(BaseModel):
    """A page of a job's evaluations in checkpoint order (iteration, then epoch)."""

    job_uuid: str
    iteration: int | None = Field(description="only this iteration's (null: every iteration's)")
    evaluations: list[Evaluation]
    total: int = Field(description="evaluations of the job (of the iteration)")
    limit: int
    offset: int


class Iteration(BaseModel):
    iteration: int
    config: dict[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None
    time_taken: float | None
    steps: list[Step]
    epochs: list[Epoch]
    evals: list[Evaluation]


class IterationEpochs(BaseModel):
    job_uuid: str
    iteration: int
    epochs: list[Epoch]
    total: int = Field(0, description="epochs of the iteration")
    limit: int = 0
    offset: int = 0


class EpochPage(BaseModel):
    """A page of a job's epochs in training order (iteration, then epoch)."""

    job_uuid: str
    iteration: int | None = Field(description="only this iteration's (null: every iteration's)")
    epochs: list[Epoch]
    total: int = Field(description="epochs of the job (of the iteration)")
    limit: int
    offset: int


class IterationSeries(BaseModel):
    """One iteration's curve of a metric: every epoch, or when it has more epochs than ``points``
    buckets of consecutive epochs (each with its last epoch's value and the lowest and highest)."""

    iteration: int
    epochs_total: int = Field(description="epochs stored in the iteration")
    epochs: list[int] = Field(description="x: the last epoch of each bucket (each epoch when not downsampled)")
    values: list[float | None] = Field(description="the metric at that epoch (null: not a number there)")
    low: list[float | None] = Field(description="the lowest value in the bucket")
    high: list[float | None] = Field(description="the highest value in the bucket")
    counts: list[int] = Field(description="epochs in the bucket (1: not downsampled)")


class MetricSeries(BaseModel):
    """A per-epoch metric of a job, downsampled in the database for a chart."""

    job_uuid: str
    metric: str
    metrics: list[str] = Field(
        description="the numeric per-epoch metrics of the epochs sampled here (every epoch when not downsampled): "
        "avg_loss first, then by name"
    )
    points: int = Field(description="at most this many buckets per iteration")
    epochs_total: int = Field(description="epochs of the job")
    iterations_total: int = Field(description="iterations with epochs (only the last ones are in `iterations`)")
    iterations: list[IterationSeries]
    cursor: str = Field(
        description="the stream cursor read before the series: GET .../stream?after=<cursor> sends what was stored "
        "since (epoch rows it also has are in the series already)"
    )


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="for GET /v1/jobs/{uuid}/artifacts/{id}")
    name: str = Field(description="path relative to the job's outputs")
    uri: str
    size_bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, row: Artifact) -> ArtifactInfo:
        return cls.model_validate(row)


class InstanceInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    provider: str
    instance_id: str | None
    instance_type: str | None
    region: str | None
    spot: bool
    state: str
    state_reason: str | None
    price_per_hour: float | None
    billable_seconds: float | None
    cost_usd: float | None
    created_at: datetime
    launched_at: datetime | None
    ready_at: datetime | None
    terminated_at: datetime | None
    node_rank: int = Field(0, description="The node's rank in a multi-node job (0: writes global.json)")
    node_group: str | None = Field(None, description="The launch attempt of a multi-node job's node (node 0's name)")
    gpu_name: str | None = Field(None, description="GPU model of the offer launched (null: none, e.g. local)")
    gpu_count: int = Field(0, description="GPUs of the offer launched")

    @classmethod
    def of(cls, row: Instance) -> InstanceInfo:
        return cls.model_validate(row)


class JobDetails(Job):
    """The job with what is stored about it: its epochs and evaluations one page at a time."""

    iterations: list[Iteration]
    artifacts: list[ArtifactInfo]
    instances: list[InstanceInfo]
    params: dict[str, Any] = Field(
        description="the job's params as register_job validated them; `config` holds its hyperparameters"
    )
    training_config: dict[str, Any] | None = Field(
        description="the training config the trainer reported (GROUP_ITERATION start); null when none"
    )
    outputs_uri: str | None = Field(description="where the job's outputs are uploaded (`<outputs_uri>/<job uuid>`)")
    epochs_total: int = Field(0, description="epochs of the job: `iterations` hold one page of them")
    epochs_limit: int = Field(0, description="the page of epochs: at most this many, in (iteration, epoch) order")
    epochs_offset: int = Field(0, description="the page of epochs starts after this many")
    evals_total: int = Field(0, description="evaluations of the job: `iterations` hold one page of them")
    evals_limit: int = 0
    evals_offset: int = 0
    iterations_total: int = Field(0, description="iterations of the job (the first ones are in `iterations`)")
    artifacts_total: int = Field(0, description="artifacts of the job (the first ones by name are in `artifacts`)")
    latest_evaluation: Evaluation | None = Field(None, description="the last evaluation (by iteration, then epoch)")


class JobLog(BaseModel):
    """The last lines of a job's trainer log: live while the job runs, then from the uploaded log."""

    job_uuid: str
    source: Literal["live", "uploaded", "none"] = Field(
        description="live: the lines the follower keeps on the job row while the job trains (also after it ended "
        "when no uploaded log can be read); uploaded: the end of the uploaded logs/trainer.log; none: no log yet"
    )
    lines: list[str] = Field(description="oldest first; a line longer than 1000 characters is cut and says so")
    truncated: bool = Field(description="earlier lines of the log exist that are not in `lines`")
    uri: str | None = Field(description="the uploaded log (source uploaded)")
    updated_at: datetime | None = Field(description="live: when the lines were stored; uploaded: when it was uploaded")
    detail: str | None = Field(description="why the uploaded log was not read, when a job that ended has one")


class Champion(BaseModel):
    """The model of a name that is champion now: the decision that promoted it."""

    job_uuid: str
    metric: str
    value: float | None = Field(description="the job's metric when it was promoted")
    decided_at: datetime = Field(description="when it was promoted")
    reason: str = Field(description='e.g. "promoted: f1 0.9389 >= champion 0.9101 + 0.005"')
    dag_id: str
    run_id: str


class LatestDecision(BaseModel):
    """The most recent promotion decision of a name, promoted or not."""

    job_uuid: str
    metric: str
    value: float | None
    promoted: bool
    reason: str
    decided_at: datetime


class ModelSummary(BaseModel):
    name: str = Field(description="the model's name: the retraining spec's name")
    champion: Champion | None = Field(description="null: none yet (or its DAG is not readable by the user)")
    latest: LatestDecision
    decision_count: int = Field(description="decisions of this name (that the user may read)")


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelDecision(BaseModel):
    """One promotion decision: a retrained model compared with the champion of its name."""

    job_uuid: str
    metric: str
    value: float | None = Field(description="the candidate's metric (its last evaluation); null: it reported none")
    previous_champion_job_uuid: str | None = Field(
        description="the champion it was compared with (null: there was none, or its DAG is not readable)"
    )
    previous_value: float | None = Field(description="that champion's metric")
    promoted: bool
    is_champion: bool = Field(description="still the champion (at most one decision of a name)")
    reason: str
    rule: dict[str, Any] = Field(
        description='the rule of the spec, e.g. {"metric": "f1", "mode": "max", "min_delta": 0.005}'
    )
    dag_id: str
    run_id: str
    decided_at: datetime
    retired_at: datetime | None = Field(description="when another model took its place")


class ModelDetails(BaseModel):
    name: str
    champion: Champion | None
    decisions: list[ModelDecision] = Field(description="newest first")
    total: int = Field(description="decisions of this name (that the user may read)")
    limit: int
    offset: int
