'use client';
import { useTracklet } from 'tracklet/react';

export default function Home() {
  const { track, forceSend, pendingCount } = useTracklet();
  return (
    <main id="home-page">
      <button id="add" onClick={() => track('Next Clicked', { n: 1 })}>
        Add
      </button>
      <button id="send" onClick={() => forceSend()}>
        Send
      </button>
      <p id="pending">{pendingCount} pending</p>
    </main>
  );
}
