// Types shared by every entry of the `tracklet` package (hand-written; the source of truth
// is npm/src/facade.js).

/** What autocapture records. `true` (the default) is all three; `false` is none. */
export interface AutocaptureOptions {
  /** `page_view` on load, SPA navigation (once per path) and back-forward-cache restore. Default true. */
  pageView?: boolean;
  /** `click` with tag, id, classes, short text, href and a CSS path (never form values). Default true. */
  click?: boolean;
  /** `scroll` at 25/50/75/100 % depth, each once per page view. Default true. */
  scroll?: boolean;
}

export interface TrackletOptions {
  /** The collector's base URL; batches go to `endpoint + "/v1/batch"`. Required. */
  endpoint: string;
  /** The project's write key. Required. */
  apiKey: string;
  /** Send when this many events are queued; a larger backlog goes in bigger requests (up to
   * 1,000 events and 60 KB). Default 50. */
  maxBatchSize?: number;
  /** ... or when the oldest queued event is this many ms old. Default 5000. */
  maxWaitTime?: number;
  /** Most events kept; when full the oldest are dropped (and reported). Default 1000. */
  maxQueueSize?: number;
  /** Default true. */
  autocapture?: boolean | AutocaptureOptions;
  /** `{eventName: rate}` with rate from 0 to 1, for noisy events. Default `{}`. */
  sampling?: Record<string, number>;
  /** Event names never sampled out or dropped for space. Default `[]`. */
  alwaysKeep?: string[];
  /** Do Not Track and Global Privacy Control turn tracking off. Default true. */
  respectPrivacySignals?: boolean;
  /** Log what goes wrong to the console. Default false. */
  debug?: boolean;
}

/** Any JSON-serialisable object. */
export type Properties = Record<string, unknown>;

export interface TrackerStatus {
  /** Events not yet acknowledged, in flight included. */
  pending: number;
  /** Events in the request being sent now. */
  inFlight: number;
  /** The last send error, or null after a success. */
  lastError: string | null;
  /** When a batch was last acknowledged (ms since the epoch), or null. */
  lastSentAt: number | null;
  /** When the next retry is due (ms since the epoch), or null. */
  nextRetryAt: number | null;
  online: boolean;
  /** Events the collector rejected. */
  rejected: number;
  /** Events dropped because the queue was full. */
  dropped: number;
  optedOut: boolean;
}

export interface ForceSendResult {
  /** Events acknowledged by this send. */
  sent: number;
  /** Events still pending afterwards. */
  pending: number;
}

/** Returned by `init()`. No method ever throws. */
export interface Tracker {
  /** Queues an event. It is in localStorage before the current task ends. */
  track(name: string, props?: Properties): void;
  /** A `page_view` event with fresh page context. */
  page(props?: Properties): void;
  /** Sets the user id on later events and sends an `identify` event. */
  identify(userId: string, traits?: Properties): void;
  /** New anonymous id and session, no user id (for logout). */
  reset(): void;
  /** Stops tracking (persisted) and discards the queue. */
  optOut(): void;
  /** Resumes tracking. */
  optIn(): void;
  /** Sends everything now, skipping the backoff wait but never a server's `Retry-After`. */
  forceSend(): Promise<ForceSendResult>;
  /** Same as `forceSend()`. */
  flush(): Promise<ForceSendResult>;
  /** Discards the queued events; returns how many were removed. */
  clearEvents(): number;
  /** Events not yet acknowledged, in flight included. */
  pendingCount(): number;
  status(): TrackerStatus;
  /** Calls `cb` after changes, at most once per task. Returns an unsubscribe function. */
  onStatus(cb: (status: TrackerStatus) => void): () => void;
  /** Resolves when the wasm is loaded (or failed to load). */
  ready(): Promise<void>;
}
