// Generated from `tracklet_core::Status::default()` by the sdk-core test
// `idle_status_js_is_generated_from_the_status_type`: do not edit. After changing
// `Status`, run `TRACKLET_WRITE_GENERATED=1 cargo test -p tracklet-core idle_status`.
export const IDLE_STATUS = Object.freeze({
  "pending": 0,
  "inFlight": 0,
  "lastError": null,
  "lastSentAt": null,
  "nextRetryAt": null,
  "online": false,
  "rejected": 0,
  "dropped": 0,
  "optedOut": false
});
