// A static export (next build writes out/), served by the packaging tests' static server.
// StrictMode mounts the provider twice in development-like checks: it must still start one
// tracker.
export default { output: 'export', reactStrictMode: true, trailingSlash: true };
