// The page's own URL: every view lives in the hash, so it survives a reload and can be shared.
//
//   #/?status=&project_id=&provider=&offset=   the jobs table and its filters
//   #/jobs/<uuid>?metric=                      a job
//   #/compare?jobs=<uuid>,<uuid>&metric=       jobs side by side
//   #/runs/<dag_id>/<run_id>?stage=&map_index= the jobs of one dag run
//   #/models/<name>                            a model's promotion decisions
//
// Airflow 3.3.2 shows the page in an iframe (nav entry "Training jobs", /plugin/training-jobs) and
// copies the iframe's location into its own URL only on the iframe's `load` event, never on a hash
// change: so the page writes the top URL itself (same origin), and reloading or sharing the Airflow
// URL opens the same view.

/** The Airflow base URL: this page is served at <base>/training/ui/. */
export function airflowBase(href = window.location.href) {
  const here = href.split("#")[0];
  const at = here.lastIndexOf("/training/ui/");
  return at >= 0 ? here.slice(0, at + 1) : new URL("/", here).href;
}

function decode(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part; // a stray "%": taken as it is
  }
}

/** The route of a hash: {name, args, query}. */
export function parseHash(hash = window.location.hash) {
  const raw = hash.replace(/^#/, "") || "/";
  const q = raw.indexOf("?");
  const parts = (q < 0 ? raw : raw.slice(0, q)).split("/").filter(Boolean).map(decode);
  const query = Object.fromEntries(new URLSearchParams(q < 0 ? "" : raw.slice(q + 1)));
  const [head, ...rest] = parts;
  if (head === "jobs" && rest.length === 1) return { name: "job", uuid: rest[0], query };
  if (head === "compare") return { name: "compare", query };
  if (head === "runs" && rest.length >= 2) return { name: "run", dagId: rest[0], runId: rest.slice(1).join("/"), query };
  if (head === "models" && rest.length === 1) return { name: "model", model: rest[0], query };
  return { name: "jobs", query };
}

/** "#/a/b?k=v" from path parts (each encoded) and a query (empty values left out). */
export function href(parts, query = {}) {
  const path = parts.map((p) => encodeURIComponent(p)).join("/");
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") search.set(k, String(v));
  }
  const qs = search.toString().replace(/%2C/gi, ","); // "jobs=a,b": commas need no escape in a query
  return `#/${path}${qs ? `?${qs}` : ""}`;
}

export const jobHref = (uuid) => href(["jobs", uuid]);
export const compareHref = (uuids, query = {}) => href(["compare"], { jobs: uuids.join(","), ...query });
export const runHref = (dagId, runId, query = {}) => href(["runs", dagId, runId], query);

/** Goes to ``target`` (a "#/..." hash); ``replace``: without a new history entry (a filter, a metric). */
export function navigate(target, { replace = false } = {}) {
  if (target === window.location.hash) return;
  if (replace) {
    window.history.replaceState(window.history.state, "", target);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  } else {
    window.location.hash = target;
  }
}

/** The path Airflow shows this page at, when the page is its nav entry's iframe (else null). */
function navEntryPath() {
  if (window.parent === window) return null;
  try {
    const prefix = `${new URL(airflowBase()).pathname}plugin/training-jobs`;
    const top = window.parent.location.pathname;
    return top === prefix || top.startsWith(`${prefix}/`) ? prefix : null;
  } catch {
    return null; // another origin embeds it
  }
}

/** Writes the current view into the Airflow UI's URL (only in its nav entry's iframe, not in a
 * dag run's tab): /plugin/training-jobs/training/ui/#/jobs/<uuid>. */
export function mirrorToParent() {
  const prefix = navEntryPath();
  if (prefix === null) return;
  const want = `${prefix}/training/ui/${window.location.hash}`;
  const top = window.parent.location;
  if (`${top.pathname}${top.search}${top.hash}` !== want) {
    // Airflow's router keeps its own state in history.state: kept as it is.
    window.parent.history.replaceState(window.parent.history.state, "", want);
  }
}

// --- links into the Airflow UI (verified against the 3.3.2 UI's router: dags/:dagId/runs/:runId,
// .../tasks/:taskId and .../tasks/:taskId/mapped/:mapIndex, whose default tab is the task's log).

export const dagRunUrl = (dagId, runId) =>
  `${airflowBase()}dags/${encodeURIComponent(dagId)}/runs/${encodeURIComponent(runId)}`;

/** The task id of one step of a job: "<stage>.<step>" inside a pipeline stage's or a sweep's task group. */
export const taskId = (stage, step) => (stage ? `${stage}.${step}` : step);

/** A task's page (its log) in a dag run; ``mapIndex`` >= 0 for a sweep trial's mapped task. */
export function taskUrl(dagId, runId, task, mapIndex = -1) {
  const base = `${dagRunUrl(dagId, runId)}/tasks/${encodeURIComponent(task)}`;
  return mapIndex !== null && mapIndex !== undefined && Number(mapIndex) >= 0 ? `${base}/mapped/${Number(mapIndex)}` : base;
}

/** The steps of every job (gpu_training/taskgroup.py STEP_TASK_IDS). */
export const STEP_TASK_IDS = [
  "register_job",
  "build_config",
  "provision",
  "wait_until_ready",
  "transfer_inputs",
  "start_trainer",
  "sense_progress",
  "upload_outputs",
  "teardown",
  "finalize",
];
