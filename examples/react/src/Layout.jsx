// The layout starts Tracklet once with a provider; components below use the hook.
import { useEffect, useState } from 'react';
import { TrackletProvider, SyncStatus, useTracklet } from 'tracklet/react';
import { Shop } from './Shop.jsx';

// Settings from the query string (?endpoint=...&apiKey=...&maxBatchSize=...), else Vite env
// variables, else the collector on this origin.
const q = new URLSearchParams(location.search);
const options = {
  endpoint: q.get('endpoint') || import.meta.env.VITE_TRACKLET_ENDPOINT || location.origin,
  apiKey: q.get('apiKey') || import.meta.env.VITE_TRACKLET_API_KEY || '',
  maxBatchSize: Number(q.get('maxBatchSize')) || 10,
  maxWaitTime: q.has('maxWaitTime') ? Number(q.get('maxWaitTime')) : 3000,
  autocapture: { pageView: true, click: false, scroll: false },
  debug: true,
};

// A client-side router in a few lines: pushState, and re-render on popstate.
function usePath() {
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const onPop = () => setPath(location.pathname);
    addEventListener('popstate', onPop);
    return () => removeEventListener('popstate', onPop);
  }, []);
  const go = (to) => {
    history.pushState(null, '', to + location.search);
    setPath(location.pathname);
  };
  return [path, go];
}

function Controls() {
  const { forceSend, clearEvents, pendingCount } = useTracklet();
  return (
    <>
      <button id="send-now" onClick={() => forceSend()} disabled={!pendingCount}>
        Send now
      </button>
      <button id="clear" onClick={() => clearEvents()}>
        Clear
      </button>
    </>
  );
}

export function Layout() {
  const [path, go] = usePath();
  const link = (to, label) => (
    <a href={to} onClick={(e) => (e.preventDefault(), go(to))}>
      {label}
    </a>
  );
  const base = path.replace(/(cart\/?)?$/, '');
  return (
    <TrackletProvider options={options}>
      <header>
        <h1>Tracklet shop</h1>
        <SyncStatus />
        <Controls />
      </header>
      <nav>
        {link(base, 'Products')}
        {link(base + 'cart', 'Cart')}
      </nav>
      {path.endsWith('/cart') ? <p id="cart-page">Your cart is a demo.</p> : <Shop />}
    </TrackletProvider>
  );
}
