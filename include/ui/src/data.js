// Every read of a job's data, in one place: the job view, the comparison and the run view load a
// job through these functions. Nothing here holds a job's every epoch or evaluation: the details
// come without them (their totals only), the chart plots a series the API downsampled in the
// database (at most SERIES_POINTS buckets), the evaluations are the latest EVALS_SHOWN, read a page
// at a time, and the stream of a running job is opened after them (?after=<the series' cursor>) so
// it brings only what is stored later, kept to a bounded number too.
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { TERMINAL, api, explain, streamUrl } from "./api.js";
import { jobEnd } from "./format.js";
import { DEFAULT_METRIC, chosenMetric, mergeRows, metricNames } from "./metrics.js";
import { airflowBase } from "./router.js";

const RUNNING_REFRESH_MS = 10000;
const ENDED_REFRESH_MS = 3000;
const LOG_REFRESH_MS = 3000;
const SERIES_RETRY_MS = 5000;
/** Buckets of a chart's series, shared by the iterations drawn (a chart is ~1000 px wide). */
export const SERIES_POINTS = 1000;
/** The evaluations a job view holds: the latest ones, read EVAL_PAGE at a time. */
export const EVALS_SHOWN = 2000;
const EVAL_PAGE = 500;
/** Epochs from the stream kept beside the series; beyond, the series is read again. */
export const LIVE_EPOCHS_MAX = 2000;
const enc = encodeURIComponent;

/** GET /v1/jobs/<uuid>/details without epochs or evaluations: the job, its iterations, artifacts,
 * instances, `epochs_total`, `evals_total` and `latest_evaluation`. */
export const fetchDetails = (uuid) => api(`jobs/${enc(uuid)}/details`, { params: { epochs_limit: 0, evals_limit: 0 } });

/** GET /v1/jobs/<uuid>/series: one per-epoch metric, downsampled by the API, and the stream cursor. */
export const fetchSeries = (uuid, metric, points = SERIES_POINTS) =>
  api(`jobs/${enc(uuid)}/series`, { params: { metric, points } });

/** The latest `max` of a job's `total` evaluations (GET /v1/jobs/<uuid>/evaluations, a page at a
 * time: the next from where the last ended, as a page is shorter when its rows are large), in
 * checkpoint order. */
export async function fetchLatestEvaluations(uuid, total, max = EVALS_SHOWN) {
  const rows = [];
  let offset = Math.max(0, total - max);
  while (offset < total && rows.length < max) {
    const page = await api(`jobs/${enc(uuid)}/evaluations`, { params: { limit: EVAL_PAGE, offset } });
    if (!page.evaluations.length) break;
    rows.push(...page.evaluations);
    offset += page.evaluations.length;
  }
  return rows;
}

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

const cursorEpoch = (cursor) => Number(String(cursor || "0-0").split("-")[0]);

/** One job for its view, live while it has not ended: the details (re-read now and then until the
 * job is settled, more often once it ended: its upload and teardown are still to come), the
 * series of the metric shown (`wanted` when the job has it), the latest evaluations, and the
 * stream's epochs and evaluations as they are stored. */
export function useJobData(uuid, wanted) {
  const [details, setDetails] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);
  const [series, setSeries] = useState(null);
  const [liveEpochs, setLiveEpochs] = useState([]);
  const [evals, setEvals] = useState(null);
  // Bumped when the job ends (read everything once more); `refills` when the stream brought many
  // epochs (the series again, which has them: fewer rows held).
  const [version, setVersion] = useState(0);
  const [refills, setRefills] = useState(0);
  const cursor = useRef(null);

  const names = useMemo(() => metricNames(series, liveEpochs), [series, liveEpochs]);
  const metric = chosenMetric(names, wanted) ?? wanted ?? DEFAULT_METRIC;

  useEffect(() => {
    setDetails(null);
    setSeries(null);
    setLiveEpochs([]);
    setEvals(null);
    setError(null);
    cursor.current = null;
  }, [uuid]);

  // The details, until settled.
  useEffect(() => {
    let alive = true;
    let timer = null;
    const tick = () => {
      clearTimeout(timer);
      fetchDetails(uuid)
        .then((body) => {
          if (!alive) return;
          // A job the page saw end (its cancel) is not shown running again by a read that raced it.
          setDetails((d) => (d && TERMINAL.has(d.status) && !TERMINAL.has(body.status) ? { ...body, ...ended(d) } : body));
          setError(null);
          if (!settled(body)) timer = setTimeout(tick, TERMINAL.has(body.status) ? ENDED_REFRESH_MS : RUNNING_REFRESH_MS);
        })
        .catch((err) => {
          if (!alive) return;
          setError(explain(err));
          timer = setTimeout(tick, RUNNING_REFRESH_MS);
        });
    };
    tick();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [uuid, version]);

  // The series of the metric shown: its cursor is where the stream starts.
  // A read that failed (the server restarting, a dropped connection) is tried again: the chart
  // would otherwise say "Loading" until the page is reloaded.
  useEffect(() => {
    let alive = true;
    let timer = null;
    const read = () =>
      fetchSeries(uuid, metric)
        .then((body) => {
          if (!alive) return;
          cursor.current = cursor.current ?? body.cursor;
          setSeries(body);
          setError(null);
          // The series has every epoch stored before its cursor: the stream's older ones go.
          setLiveEpochs((rows) => rows.filter((r) => r.id > cursorEpoch(body.cursor)));
        })
        .catch((err) => {
          if (!alive) return;
          setError(explain(err));
          timer = setTimeout(read, SERIES_RETRY_MS);
        });
    read();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [uuid, metric, version, refills]);
  const tooManyLive = liveEpochs.length >= LIVE_EPOCHS_MAX;
  useEffect(() => {
    if (tooManyLive) setRefills((n) => n + 1);
  }, [tooManyLive]);

  // The latest evaluations, once the details say how many (again when the job ended).
  const evalsTotal = details ? details.evals_total : null;
  useEffect(() => {
    if (evalsTotal === null) return undefined;
    let alive = true;
    fetchLatestEvaluations(uuid, evalsTotal)
      .then((rows) => alive && setEvals((had) => mergeRows(had ?? [], rows, EVALS_SHOWN)))
      .catch((err) => alive && setError(explain(err)));
    return () => {
      alive = false;
    };
  }, [uuid, evalsTotal === null, version]);

  // The stream of a running job, from the first series' cursor on.
  const running = details !== null && !TERMINAL.has(details.status);
  const ready = running && series !== null && evals !== null;
  useEffect(() => {
    if (!ready) return undefined;
    const source = new EventSource(streamUrl(uuid, { after: cursor.current || "0-0" }));
    source.onopen = () => setLive(true);
    source.onerror = () => setLive(source.readyState === EventSource.OPEN);
    source.addEventListener("epoch", (ev) => {
      const row = JSON.parse(ev.data);
      setLiveEpochs((rows) => (rows.some((r) => r.id === row.id) ? rows : [...rows, row].slice(-LIVE_EPOCHS_MAX)));
    });
    source.addEventListener("eval", (ev) => setEvals((rows) => mergeRows(rows ?? [], [JSON.parse(ev.data)], EVALS_SHOWN)));
    source.addEventListener("status", (ev) => {
      const job = JSON.parse(ev.data);
      setDetails((d) => d && { ...d, ...job });
      if (TERMINAL.has(job.status)) {
        source.close();
        setLive(false);
        setVersion((v) => v + 1); // artifacts, instances, costs, the whole series, until settled
      }
    });
    return () => {
      source.close();
      setLive(false);
    };
  }, [uuid, ready]);

  return { details, setDetails, error, live, series, liveEpochs, evals: evals ?? [], names, metric };
}

const ended = (d) => ({ status: d.status, cancelled_by: d.cancelled_by, cancel_requested_at: d.cancel_requested_at });

/** Several jobs side by side (the comparison): their details and the series of one metric (`wanted`
 * when one of them has it), read once: {list, series, names, metric, error}. */
export function useCompared(uuids, wanted) {
  const [list, setList] = useState(null);
  const [series, setSeries] = useState(null);
  const [error, setError] = useState(null);
  const key = uuids.join(",");
  const names = useMemo(() => {
    const all = new Set((series || []).flatMap((s) => s.metrics));
    return metricNames({ metrics: [...all] }, []);
  }, [series]);
  const metric = chosenMetric(names, wanted) ?? wanted ?? DEFAULT_METRIC;
  useEffect(() => {
    let alive = true;
    setList(null);
    setError(null);
    Promise.all(uuids.map((u) => fetchDetails(u)))
      .then((found) => alive && setList(found))
      .catch((err) => alive && setError(explain(err)));
    return () => {
      alive = false;
    };
  }, [key]);
  useEffect(() => {
    let alive = true;
    Promise.all(uuids.map((u) => fetchSeries(u, metric)))
      .then((found) => alive && setSeries(found))
      .catch((err) => alive && setError(explain(err)));
    return () => {
      alive = false;
    };
  }, [key, metric]);
  return { list, series, names, metric, error };
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
