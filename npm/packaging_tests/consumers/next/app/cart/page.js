'use client';
import { useTracklet } from 'tracklet/react';

export default function Cart() {
  const { forceSend } = useTracklet();
  return (
    <main id="cart-page">
      <button id="send" onClick={() => forceSend()}>
        Send
      </button>
    </main>
  );
}
