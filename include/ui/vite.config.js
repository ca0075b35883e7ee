// Builds the Training jobs page into plugins/gpu_training/ui_dist/ (git-ignored), which the plugin
// serves at /training/ui/. Relative asset URLs ("./assets/...") keep it working under any base URL.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  resolve: {
    alias: {
      react: "preact/compat",
      "react-dom": "preact/compat",
    },
  },
  build: {
    outDir: fileURLToPath(new URL("../../plugins/gpu_training/ui_dist", import.meta.url)),
    emptyOutDir: true,
    sourcemap: false,
    chunkSizeWarningLimit: 300,
  },
  server: {
    // `AIRFLOW_URL=http://localhost:8080 npm run dev`: the page at http://localhost:5173/ calls ../v1
    // (= /v1), proxied to the api-server's /training/v1 with the browser's `_token` cookie (cookies
    // are per host, not per port: sign in on localhost:8080 first).
    proxy: {
      "/v1": {
        target: process.env.AIRFLOW_URL || "http://localhost:8080",
        rewrite: (path) => `/training${path}`,
      },
    },
  },
});
