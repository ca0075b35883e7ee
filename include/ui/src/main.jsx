import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { JobView } from "./JobView.jsx";
import { JobsTable } from "./JobsTable.jsx";
import "./style.css";

// Hash routes (#/ and #/jobs/<uuid>): the Airflow UI mirrors the iframe's URL into its own
// (/plugin/training-jobs/training/ui/#/jobs/<uuid>), so a job's page can be linked to.
function route() {
  const m = window.location.hash.match(/^#\/jobs\/([^/?#]+)/);
  return m ? { job: decodeURIComponent(m[1]) } : {};
}

function App() {
  const [where, setWhere] = useState(route());
  useEffect(() => {
    const onHash = () => setWhere(route());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  return <main>{where.job ? <JobView uuid={where.job} key={where.job} /> : <JobsTable />}</main>;
}

render(<App />, document.getElementById("app"));
