import { useEffect, useState } from "preact/hooks";
import { explain } from "./api.js";
import { fetchJobs, useTaskInstance } from "./data.js";
import { JobView } from "./JobView.jsx";
import { CompareButton, JobHeadings, JobRows, useSelection } from "./JobsTable.jsx";
import { compareHref, dagRunUrl, runHref, taskId, taskUrl } from "./router.js";

const REFRESH_MS = 5000;

const COLUMNS = [
  { title: "Stage", cell: (job) => job.stage || "—" },
  { title: "Trial", cell: (job) => (job.map_index >= 0 ? `#${job.map_index}` : "—") },
  { title: "Project", cell: (job) => job.project_id },
  { title: "Provider", cell: (job) => job.provider },
];

/** Why a run has no job, from its register_job task's state in Airflow. */
function RegisterState({ ti, task }) {
  const say = (state, text) => (
    <p class={state === "failed" ? "error" : undefined} data-testid="register-state" data-state={state}>
      {text}
    </p>
  );
  if (!ti) return <p class="muted">Asking Airflow about {task}…</p>;
  if (ti.status === 404) {
    return say(
      "absent",
      `Airflow has no task ${task} in this dag run: it is not a run of a training DAG (or no such run, stage or trial).`,
    );
  }
  if (ti.status !== 200) {
    return (
      <ul>
        <li>It may be a run of a DAG that trains nothing.</li>
        <li>Or {task} refused the run's params, so no job was created and nothing was provisioned: its log says why.</li>
      </ul>
    );
  }
  if (ti.state === "failed" || ti.state === "upstream_failed") {
    return say(
      "failed",
      `${task} failed: it refused this run's params (or could not record the job), so no job was created and ` +
        "nothing was provisioned. Its log says which param and why.",
    );
  }
  if (ti.state === "success") return say("success", `${task} succeeded, but its job is not one you may read.`);
  return say(ti.state || "none", `${task} has not run yet (${ti.state || "no state"}): this page looks again every few seconds.`);
}

/** The jobs of one dag run (#/runs/<dag_id>/<run_id>?stage=&map_index=): the Airflow dag run's
 * "Training" tab and the tasks' "Training job" link open it. One job: its view in place; several
 * (a sweep's trials, a pipeline's stages): a table of them; none: why that may be. */
export function RunView({ dagId, runId, query = {} }) {
  const stage = query.stage ?? "";
  const mapIndex = query.map_index !== undefined && query.map_index !== "" ? Number(query.map_index) : null;
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [selected, onSelect, clear] = useSelection();
  const register = taskId(stage, "register_job");
  const registerTi = useTaskInstance(dagId, runId, register, mapIndex, Boolean(data) && data.jobs.length === 0);

  useEffect(() => {
    let alive = true;
    const params = { dag_id: dagId, run_id: runId, limit: 500, stage: stage || undefined };
    if (mapIndex !== null && Number.isInteger(mapIndex)) params.map_index = mapIndex;
    const load = () =>
      fetchJobs(params)
        .then((body) => alive && (setData(body), setError(null)))
        .catch((err) => alive && setError(explain(err)));
    load();
    const timer = setInterval(load, REFRESH_MS);
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [dagId, runId, stage, mapIndex]);

  const filtered = Boolean(stage) || (mapIndex !== null && mapIndex >= 0);
  const runLink = (
    <a href={dagRunUrl(dagId, runId)} target="_top" data-testid="dag-run-link" class="mono">
      {dagId} / {runId}
    </a>
  );
  const back = (
    <p>
      <a href="#/">‹ All jobs</a> · dag run {runLink}
      {filtered && (
        <>
          {" "}
          · <a href={runHref(dagId, runId)}>every job of this run</a>
        </>
      )}
    </p>
  );
  if (!data) {
    return (
      <section data-testid="run-view">
        {back}
        {error ? <p class="error" role="alert">{error}</p> : <p>Loading…</p>}
      </section>
    );
  }
  // In the run's order: a pipeline's stages as they were registered, a sweep's trials by index.
  const jobs = data.jobs.slice().sort((a, b) => a.created_at.localeCompare(b.created_at) || a.map_index - b.map_index);
  if (jobs.length === 1) {
    return (
      <JobView
        key={jobs[0].uuid}
        uuid={jobs[0].uuid}
        query={query}
        back={back}
        routeFor={(q) => runHref(dagId, runId, q)}
      />
    );
  }
  if (jobs.length === 0) {
    const what = stage ? `stage ${stage}${mapIndex !== null && mapIndex >= 0 ? ` #${mapIndex}` : ""} of ` : "";
    return (
      <section data-testid="run-view" data-jobs="0">
        {back}
        <h1>No training job in this run</h1>
        <div class="empty-run" data-testid="no-job">
          <p>
            The results database has no training job for {what}dag run <b class="mono">{runId}</b> of{" "}
            <b class="mono">{dagId}</b> (that you may read).
          </p>
          <RegisterState ti={registerTi} task={register} />
          <p>
            <a href={taskUrl(dagId, runId, register, mapIndex ?? -1)} target="_top" data-testid="register-log-link">
              Open the {register} log
            </a>{" "}
            · <a href={dagRunUrl(dagId, runId)} target="_top">the dag run</a>
          </p>
        </div>
      </section>
    );
  }
  const now = Date.now() / 1000;
  return (
    <section data-testid="run-view" data-jobs={jobs.length}>
      {back}
      <h1>
        {jobs.length} training jobs <span class="small mono">in {runId}</span>
      </h1>
      <p class="filters">
        <a href={compareHref(jobs.map((j) => j.uuid))} data-testid="compare-all" class="button">
          Compare all {jobs.length}
        </a>
        <CompareButton selected={selected} onClear={clear} />
      </p>
      <div class="scroll-x">
        <table class="jobs" data-testid="run-jobs">
          <thead>
            <JobHeadings columns={COLUMNS} />
          </thead>
          <tbody>
            <JobRows jobs={jobs} selected={selected} onSelect={onSelect} columns={COLUMNS} now={now} />
          </tbody>
        </table>
      </div>
    </section>
  );
}
