// Every read of a job's data, in one place: the job view, the comparison and the run view load
// details through these functions, so paging them later (epochs and evaluations in pages) changes
// this file only.
import { useEffect, useState } from "preact/hooks";
import { TERMINAL, api, explain, streamUrl } from "./api.js";
import { jobEnd } from "./format.js";
import { airflowBase } from "./router.js";

const RUNNING_REFRESH_MS = 10000;
const ENDED_REFRESH_MS = 3000;
const LOG_REFRESH_MS = 3000;
const enc = encodeURIComponent;

/** GET /v1/jobs/<uuid>/details: the job, its iterations (epochs, evaluations), artifacts, instances. */
export const fetchDetails = (uuid) => api(`jobs/${enc(uuid)}/details`);

/** GET /v1/jobs with filters (status, project_id, provider, dag_id, run_id, stage, map_index, ...). */
export const fetchJobs = (params) => api("jobs", { params });

/** GET /v1/jobs/<uuid>/log: the trainer log's last lines (live, or the uploaded log). */
export const fetchLog = (uuid, lines) => api(`jobs/${enc(uuid)}/log`, { params: { lines } });

/** A job that ended is settled once its teardown ran (every instance gone), or long after it
 * ended: its outputs, log and cost are final. Until then its details are re-read (the upload comes
 * after the end). */
export function settled(details) {
  if (!TERMINAL.has(details.status)) return false;
  if (Date.now() / 1000 - jobEnd(details) > 900) return true;
  return details.instances.every((i) => i.terminated_at || i.state === "terminated" || i.state === "failed");
}

/** Adds an epoch or evaluation row (from the stream) to the details, once (rows have ids). */
function mergeRow(details, kind, row) {
  const iterations = details.iterations.slice();
  let i = iterations.findIndex((it) => it.iteration === row.iteration);
  if (i < 0) {
    iterations.push({ iteration: row.iteration, config: null, steps: [], epochs: [], evals: [] });
    iterations.sort((a, b) => a.iteration - b.iteration);
    i = iterations.findIndex((it) => it.iteration === row.iteration);
  }
  const it = { ...iterations[i] };
  if (it[kind].some((r) => r.id === row.id)) return details;
  it[kind] = [...it[kind], row];
  iterations[i] = it;
  return { ...details, iterations };
}

/** One job's details, live while it has not ended: the SSE stream adds epochs and evaluations as
 * they are stored, and the details are re-read now and then (instances, costs) until the job is
 * settled, more often once it ended (its upload and teardown are still to come). */
export function useJobDetails(uuid) {
  const [details, setDetails] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);

  useEffect(() => {
    let alive = true;
    let source = null;
    let timer = null;
    const refresh = () =>
      fetchDetails(uuid)
        .then((body) => {
          if (alive) {
            // A job the page saw end (its cancel) is not shown running again by a read that raced it.
            setDetails((d) => (d && TERMINAL.has(d.status) && !TERMINAL.has(body.status) ? { ...body, ...ended(d) } : body));
            setError(null);
          }
          return body;
        })
        .catch((err) => {
          if (alive) setError(explain(err));
          return null;
        });
    const tick = () => {
      clearTimeout(timer);
      return refresh().then((body) => {
        if (!alive || (body && settled(body))) return body;
        timer = setTimeout(tick, body && TERMINAL.has(body.status) ? ENDED_REFRESH_MS : RUNNING_REFRESH_MS);
        return body;
      });
    };
    tick().then((body) => {
      if (!alive || !body || TERMINAL.has(body.status)) return;
      source = new EventSource(streamUrl(uuid));
      source.onopen = () => setLive(true);
      source.onerror = () => setLive(source.readyState === EventSource.OPEN);
      source.addEventListener("epoch", (ev) => setDetails((d) => d && mergeRow(d, "epochs", JSON.parse(ev.data))));
      source.addEventListener("eval", (ev) => setDetails((d) => d && mergeRow(d, "evals", JSON.parse(ev.data))));
      source.addEventListener("status", (ev) => {
        const job = JSON.parse(ev.data);
        setDetails((d) => d && { ...d, ...job });
        if (TERMINAL.has(job.status)) {
          source.close();
          setLive(false);
          tick(); // artifacts, instances and costs as they are now, then until settled
        }
      });
    });
    return () => {
      alive = false;
      source?.close();
      clearTimeout(timer);
    };
  }, [uuid]);

  return { details, setDetails, error, live };
}

const ended = (d) => ({ status: d.status, cancelled_by: d.cancelled_by, cancel_requested_at: d.cancel_requested_at });

/** The details of several jobs (the comparison), read once: [list in the order asked, error]. */
export function useDetailsOf(uuids) {
  const [state, setState] = useState({ list: null, error: null });
  const key = uuids.join(",");
  useEffect(() => {
    let alive = true;
    setState({ list: null, error: null });
    Promise.all(uuids.map((u) => fetchDetails(u)))
      .then((list) => alive && setState({ list, error: null }))
      .catch((err) => alive && setState({ list: null, error: explain(err) }));
    return () => {
      alive = false;
    };
  }, [key]);
  return [state.list, state.error];
}

/** The trainer log's last ``lines``: re-read every few seconds while the job runs, and again when
 * ``version`` changes (the uploaded log appeared, the job ended). */
export function useLog(uuid, { running, version, lines = 200 }) {
  const [log, setLog] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    let alive = true;
    const load = () =>
      fetchLog(uuid, lines)
        .then((body) => alive && (setLog(body), setError(null)))
        .catch((err) => alive && setError(explain(err)));
    load();
    const timer = running ? setInterval(load, LOG_REFRESH_MS) : null;
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [uuid, running, version, lines]);
  return [log, error];
}

/** A task instance as Airflow's REST API has it (same origin: the session cookie authenticates),
 * {status: HTTP status, state}: ``GET /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}[/{map_index}]``. */
export async function fetchTaskInstance(dagId, runId, task, mapIndex) {
  const mapped = mapIndex !== null && mapIndex !== undefined && Number(mapIndex) >= 0 ? `/${Number(mapIndex)}` : "";
  const url = `${airflowBase()}api/v2/dags/${enc(dagId)}/dagRuns/${enc(runId)}/taskInstances/${enc(task)}${mapped}`;
  const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!resp.ok) return { status: resp.status, state: null };
  const body = await resp.json();
  return { status: resp.status, state: body.state ?? null };
}

const SETTLED_TASK_STATES = new Set(["success", "failed", "upstream_failed", "skipped", "removed"]);

/** The state of one task instance, re-read every few seconds until it settles (``enabled``: ask at all). */
export function useTaskInstance(dagId, runId, task, mapIndex, enabled) {
  const [found, setFound] = useState(null);
  useEffect(() => {
    if (!enabled) return undefined;
    let alive = true;
    let timer = null;
    const load = () =>
      fetchTaskInstance(dagId, runId, task, mapIndex)
        .then((ti) => {
          if (!alive) return;
          setFound(ti);
          if (ti.status === 200 && !SETTLED_TASK_STATES.has(ti.state)) timer = setTimeout(load, 5000);
        })
        .catch(() => alive && setFound({ status: 0, state: null }));
    load();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [dagId, runId, task, mapIndex, enabled]);
  return found;
}
