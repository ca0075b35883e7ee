import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ModelView } from "./Champions.jsx";
import { JobView } from "./JobView.jsx";
import { JobsTable } from "./JobsTable.jsx";
import "./style.css";

// Hash routes (#/, #/jobs/<uuid> and #/models/<name>): the Airflow UI mirrors the iframe's URL into
// its own (/plugin/training-jobs/training/ui/#/jobs/<uuid>), so a job's page can be linked to.
function route() {
  const job = window.location.hash.match(/^#\/jobs\/([^/?#]+)/);
  if (job) return { job: decodeURIComponent(job[1]) };
  const model = window.location.hash.match(/^#\/models\/([^/?#]+)/);
  return model ? { model: decodeURIComponent(model[1]) } : {};
}

function page(where) {
  if (where.job) return <JobView uuid={where.job} key={where.job} />;
  if (where.model) return <ModelView name={where.model} key={where.model} />;
  return <JobsTable />;
}

function App() {
  const [where, setWhere] = useState(route());
  useEffect(() => {
    const onHash = () => setWhere(route());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  return <main>{page(where)}</main>;
}

render(<App />, document.getElementById("app"));
