// The page of `blisswriter serve`: the writer's scans and the files under the data roots on
// the left, the chosen file in h5web on the right. The URL holds the state
// (?file=/abs/path.h5&path=/3.1&live=1), so a link opens a scan at its entry's default plot.
import '@h5web/app/styles.css';
import './page.css';

import { App, H5GroveProvider } from '@h5web/app';
import {
  StrictMode, Suspense, startTransition, useCallback, useEffect, useRef, useState,
} from 'react';
import { createRoot } from 'react-dom/client';

const BASE = new URL('.', document.baseURI); // the server's base path (--base-path)
const api = (path) => new URL(path, BASE).href;
const LIVE_REFRESH_MS = 1000; // the writer flushes every max_lag_s / 2 (0.5 s by default)
const SCANS_REFRESH_MS = 2000;

async function getJson(path) {
  const response = await fetch(api(path), { cache: 'no-store' });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.message || `${response.status} ${response.statusText}`);
  }
  return body;
}

function readLocation() {
  const params = new URLSearchParams(window.location.search);
  return {
    file: params.get('file') || '',
    path: params.get('path') || '/',
    live: params.get('live') === '1',
  };
}

function writeLocation({ file, path, live }) {
  const params = new URLSearchParams();
  if (file) params.set('file', file);
  if (file && path && path !== '/') params.set('path', path);
  if (file && live) params.set('live', '1');
  const query = params.toString();
  window.history.pushState(null, '', query ? `?${query}` : BASE.pathname);
}

function scanHref(scan) {
  const params = new URLSearchParams({ file: scan.file, path: `/${scan.entry}` });
  if (scan.live) params.set('live', '1');
  return `?${params}`;
}

function Progress({ scan }) {
  const total = scan.expected_points;
  const done = scan.points;
  const share = total ? Math.min(1, done / total) : 0;
  return (
    <span className="progress" title={`${done}${total ? ` / ${total}` : ''} points`}>
      <span className="bar">
        <span className="fill" style={{ width: `${share * 100}%` }} />
      </span>
      {done}
      {total ? `/${total}` : ''}
    </span>
  );
}

function ScanList({ current, onOpen, onError, onScans }) {
  const [scans, setScans] = useState(null);
  const [note, setNote] = useState('');

  useEffect(() => {
    let stopped = false;
    async function load() {
      try {
        const body = await getJson('api/scans');
        if (!stopped) {
          setScans(body.scans);
          onScans(body.scans);
          setNote(body.error || '');
          onError('');
        }
      } catch (error) {
        if (!stopped) onError(`scan list: ${error.message}`);
      }
    }
    load();
    const timer = setInterval(load, SCANS_REFRESH_MS);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, [onError, onScans]);

  if (scans === null) return <p className="muted">loading scans…</p>;
  return (
    <section>
      <h2>Scans</h2>
      {note && <p className="muted">{note}</p>}
      {scans.length === 0 && !note && <p className="muted">no scan written in the last 24 h</p>}
      <table className="scans">
        <tbody>
          {scans.map((scan) => (
            <tr
              key={scan.scan_key}
              className={scan.file === current ? 'current' : ''}
              data-state={scan.state}
            >
              <td>
                {scan.session}:{scan.number}
              </td>
              <td>
                {scan.file ? (
                  <a
                    href={scanHref(scan)}
                    title={`${scan.file}::/${scan.entry}`}
                    onClick={(event) => {
                      event.preventDefault();
                      onOpen({ file: scan.file, path: `/${scan.entry}`, live: scan.live });
                    }}
                  >
                    {scan.name}
                  </a>
                ) : (
                  <span title="its file is not under the data roots">{scan.name}</span>
                )}
              </td>
              <td className={`state ${scan.state}`} title={scan.error || ''}>
                {scan.state}
              </td>
              <td>
                <Progress scan={scan} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function FileBrowser({ onOpen, onError }) {
  const [folder, setFolder] = useState('');
  const [listing, setListing] = useState(null);

  useEffect(() => {
    getJson(`api/files${folder ? `?folder=${encodeURIComponent(folder)}` : ''}`)
      .then(setListing)
      .then(() => onError(''))
      .catch((error) => onError(`files: ${error.message}`));
  }, [folder, onError]);

  if (!listing) return null;
  const name = (path) => path.split('/').filter(Boolean).pop() || path;
  return (
    <section>
      <h2>Files</h2>
      <p className="folder" title={listing.folder}>
        {listing.folder || 'data roots'}
      </p>
      <ul className="files">
        {listing.folder && (
          <li>
            <button type="button" onClick={() => setFolder(listing.parent)}>
              ..
            </button>
          </li>
        )}
        {listing.folders.map((path) => (
          <li key={path}>
            <button type="button" onClick={() => setFolder(path)}>
              {listing.folder ? `${name(path)}/` : path}
            </button>
          </li>
        ))}
        {listing.files.map((file) => (
          <li key={file.path}>
            <button
              type="button"
              className="file"
              onClick={() => onOpen({ file: file.path, path: '/', live: false })}
            >
              {name(file.path)}
            </button>
            <span className="muted"> {(file.size / 1e6).toFixed(1)} MB</span>
          </li>
        ))}
      </ul>
    </section>
  );
}

function Viewer({ file, path, live }) {
  // h5web re-reads the file when a reset key changes; in a transition, React keeps the
  // current plot on screen until the new values are there (build.mjs: h5web's patch)
  const [tick, setTick] = useState(0);
  const wasLive = useRef(live);
  useEffect(() => {
    if (!live) {
      if (wasLive.current) setTick((t) => t + 1); // the points flushed at the scan's end
      wasLive.current = false;
      return undefined;
    }
    wasLive.current = true;
    const timer = setInterval(() => startTransition(() => setTick((t) => t + 1)),
      LIVE_REFRESH_MS);
    return () => clearInterval(timer);
  }, [live]);
  return (
    <H5GroveProvider url={api('h5grove')} filepath={file} resetKeys={[tick]}>
      <Suspense fallback={<p className="muted hint">refreshing…</p>}>
        <App initialPath={path} sidebarOpen />
      </Suspense>
    </H5GroveProvider>
  );
}

function Page() {
  const [where, setWhere] = useState(readLocation);
  // one message per part of the page, so that one part's success does not hide another's error
  const [errors, setErrors] = useState({});
  const onScansError = useCallback((message) => setErrors((e) => ({ ...e, scans: message })), []);
  const onFilesError = useCallback((message) => setErrors((e) => ({ ...e, files: message })), []);
  const error = Object.values(errors).filter(Boolean).join('; ');
  const [panelOpen, setPanelOpen] = useState(!readLocation().file);

  useEffect(() => {
    const onPop = () => setWhere(readLocation());
    window.addEventListener('popstate', onPop);
    return () => window.removeEventListener('popstate', onPop);
  }, []);

  const open = useCallback((next) => {
    writeLocation(next);
    setWhere(next);
  }, []);
  const setLive = (live) => open({ ...where, live });

  // a scan that ends stops the live refresh of its entry (after one last read)
  const [scans, setScans] = useState([]);
  useEffect(() => {
    const shown = scans.find((s) => s.file === where.file && `/${s.entry}` === where.path);
    if (where.live && shown && !shown.live) {
      const next = { ...where, live: false };
      window.history.replaceState(null, '', window.location.href.replace(/[?&]live=1/, ''));
      setWhere(next);
    }
  }, [scans, where]);

  return (
    <div className="page" data-panel-open={panelOpen || !where.file ? '' : undefined}>
      <header>
        <button type="button" className="toggle" onClick={() => setPanelOpen(!panelOpen)}>
          {panelOpen ? '◀' : '▶'} scans &amp; files
        </button>
        <strong>blisswriter serve</strong>
        <span className="current-file" title={where.file}>
          {where.file || 'choose a scan or a file'}
        </span>
        {where.file && (
          <label className="live" title={`re-read the file every ${LIVE_REFRESH_MS / 1000} s`}>
            <input type="checkbox" checked={where.live}
              onChange={(event) => setLive(event.target.checked)} />
            live
          </label>
        )}
      </header>
      {error && (
        <div className="error-banner" role="alert">
          {error}
        </div>
      )}
      <div className="body">
        {/* hidden, not unmounted: the scan list also ends the live refresh */}
        <aside hidden={!panelOpen && !!where.file}>
          <ScanList current={where.file} onOpen={open} onError={onScansError}
            onScans={setScans} />
          <FileBrowser onOpen={open} onError={onFilesError} />
        </aside>
        <main>
          {where.file ? (
            <Viewer key={`${where.file}#${where.path}`} {...where} />
          ) : (
            <p className="muted hint">
              Pick a scan (it opens at its default plot) or a file under the data roots.
            </p>
          )}
        </main>
      </div>
    </div>
  );
}

createRoot(document.getElementById('root')).render(
  <StrictMode>
    <Page />
  </StrictMode>,
);
