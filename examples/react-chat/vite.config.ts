import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

export default defineConfig({
  plugins: [react()],
  // `roomcast` is linked from ../../clients/js, which has its own copy of React for its tests:
  // one React for the whole app, or the hooks would run against another copy.
  resolve: { dedupe: ["react", "react-dom"] },
});
