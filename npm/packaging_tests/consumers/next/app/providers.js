'use client';
import Link from 'next/link';
import { SyncStatus, TrackletProvider } from 'tracklet/react';

// The packaging test writes the stub collector's origin into .env.production before the build.
const options = {
  endpoint: process.env.NEXT_PUBLIC_TRACKLET_ENDPOINT,
  apiKey: 'next-key',
  maxBatchSize: 100,
  maxWaitTime: 600000,
};

export default function Providers({ children }) {
  return (
    <TrackletProvider options={options}>
      <nav>
        <Link href="/">Home</Link> <Link href="/cart/">Cart</Link> <SyncStatus />
      </nav>
      {children}
    </TrackletProvider>
  );
}
