// `tracklet`: the default entry, with the wasm inlined.
import type { Tracker, TrackletOptions } from './tracker.js';

export * from './tracker.js';

/**
 * Starts a tracker and returns it at once; calls made before the wasm is ready are kept and
 * replayed. On the server (no `window`), or without `endpoint`/`apiKey`, the tracker is inert.
 * A page has one tracker: calling `init()` again returns the running one. Never throws.
 */
export function init(options: TrackletOptions): Tracker;
export const VERSION: string;

declare const tracklet: {
  init: typeof init;
  VERSION: string;
};
export default tracklet;
