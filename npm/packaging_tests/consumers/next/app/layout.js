import Providers from './providers';

export const metadata = { title: 'Tracklet on Next.js' };

// A server component: it renders on the server (at build time for the static export);
// the tracker starts in the browser, inside the client component Providers.
export default function RootLayout({ children }) {
  return (
    <html lang="en">
      <body>
        <Providers>{children}</Providers>
      </body>
    </html>
  );
}
