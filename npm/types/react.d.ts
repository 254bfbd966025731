// `tracklet/react`: provider, hook and sync badge.
import type { CSSProperties, ReactElement, ReactNode } from 'react';
import type { Tracker, TrackerStatus, TrackletOptions } from './tracker.js';

export type { Tracker, TrackerStatus, TrackletOptions } from './tracker.js';

export type TrackletProviderProps =
  | {
      /** Starts (once per distinct options) a tracker from the default `tracklet` entry. */
      options: TrackletOptions;
      tracker?: undefined;
      children?: ReactNode;
    }
  | {
      /** A tracker you made yourself, e.g. with `tracklet/slim`. */
      tracker: Tracker;
      options?: undefined;
      children?: ReactNode;
    };

export function TrackletProvider(props: TrackletProviderProps): ReactElement;

/** What `useTracklet()` returns: the tracker's calls, and its status as state. */
export interface UseTracklet
  extends Pick<Tracker, 'track' | 'page' | 'identify' | 'reset' | 'optOut' | 'optIn' | 'forceSend' | 'clearEvents'> {
  /** The tracker itself (an inert one outside a provider). */
  tracker: Tracker;
  /** The latest status; the component re-renders when it changes. */
  status: TrackerStatus;
  /** `status.pending`: events not yet acknowledged, in flight included. */
  pendingCount: number;
  /** A batch is being sent (`status.inFlight > 0`). */
  isProcessing: boolean;
}

export function useTracklet(): UseTracklet;

export interface SyncStatusProps {
  className?: string;
  style?: CSSProperties;
}

/**
 * `<span class="tracklet-sync" data-state="idle|pending|sending|error">`: "3 pending",
 * "sending 3…", "all sent", or the retry error.
 */
export function SyncStatus(props: SyncStatusProps): ReactElement;
