import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ModelView } from "./Champions.jsx";
import { Compare } from "./Compare.jsx";
import { JobView } from "./JobView.jsx";
import { JobsTable } from "./JobsTable.jsx";
import { RunView } from "./RunView.jsx";
import { mirrorToParent, parseHash } from "./router.js";
import "./style.css";

// Hash routes (router.js): the view is in the page's own URL, and in the Airflow UI's URL when the
// page is its nav entry's iframe (/plugin/training-jobs/training/ui/#/jobs/<uuid>).

function page(where) {
  switch (where.name) {
    case "job":
      return <JobView uuid={where.uuid} query={where.query} key={where.uuid} />;
    case "compare":
      return <Compare query={where.query} />;
    case "run":
      return <RunView dagId={where.dagId} runId={where.runId} query={where.query} key={`${where.dagId}/${where.runId}`} />;
    case "model":
      return <ModelView name={where.model} key={where.model} />;
    default:
      return <JobsTable query={where.query} />;
  }
}

function App() {
  const [where, setWhere] = useState(parseHash());
  useEffect(() => {
    const onHash = () => {
      setWhere(parseHash());
      mirrorToParent();
    };
    mirrorToParent();
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  return <main>{page(where)}</main>;
}

render(<App />, document.getElementById("app"));
