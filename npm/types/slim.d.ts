// `tracklet/slim`: the default entry's API, without the inlined wasm.
import type { Tracker, TrackletOptions } from './tracker.js';

export * from './tracker.js';

/** Where `tracklet.wasm` comes from: its URL, its bytes, a (promised) Response, or a compiled module. */
export type WasmSource =
  | string
  | URL
  | ArrayBuffer
  | ArrayBufferView
  | Response
  | Promise<Response>
  | WebAssembly.Module;

export interface SlimOptions extends TrackletOptions {
  /**
   * The `tracklet.wasm` shipped as `tracklet/tracklet.wasm`. Required in the browser; the first
   * tracker's value is the one loaded.
   */
  wasm: WasmSource;
}

/** As the default entry's `init()`: one tracker per page, returned at once, never throws. */
export function init(options: SlimOptions): Tracker;
export const VERSION: string;

declare const tracklet: {
  init: typeof init;
  VERSION: string;
};
export default tracklet;
