// Builds the page into ../static (committed: a machine with only Python serves it as is).
//   cd writer/web/frontend && npm ci && npm run build
// Writes static/app.js, app.css, index.html and build-info.json, which records a hash of the
// sources (tests/test_web.py fails when the bundle is older than its sources).
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync, mkdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = fileURLToPath(new URL('.', import.meta.url));
const out = join(here, '..', 'static');

// The same list and hash as writer/web/bundle.py: sorted relative paths, each path, NUL,
// its bytes, NUL.
function sourceFiles() {
  const files = ['package.json', 'package-lock.json', 'build.mjs'];
  const walk = (dir) => {
    for (const name of readdirSync(join(here, dir))) {
      const path = join(dir, name);
      if (statSync(join(here, path)).isDirectory()) walk(path);
      else files.push(path);
    }
  };
  walk('src');
  return files.map((p) => relative('.', p).split('\\').join('/')).sort();
}

function sourceHash() {
  const hash = createHash('sha256');
  for (const path of sourceFiles()) {
    hash.update(path);
    hash.update('\0');
    hash.update(readFileSync(join(here, path)));
    hash.update('\0');
  }
  return hash.digest('hex');
}

// Live refresh without flashing: the page re-reads a growing scan by changing
// H5GroveProvider's resetKeys inside a React transition, which keeps the current plot on
// screen until the new one is ready. That needs h5web's provider and stores to stay the same
// objects while the transition retries (h5web makes them in useMemo, which React discards on
// every retry of a render that suspended before it committed: each retry would fetch anew,
// for ever). So @h5web/app 17.0.0 gets them from caches keyed by their inputs instead. The
// build stops if the code patched is not found (another h5web version: review the patch).
const H5WEB_PATCHES = [
  [
    'api: T(() => new Jl(t, n, i, a), [\n\t\t\tn,\n\t\t\tt,\n\t\t\t...r,\n\t\t\ti,\n\t\t\ta\n\t\t]),',
    'api: __liveMemoByDeps(() => new Jl(t, n, i, a), [n, t, ...r, i, a]),',
  ],
  [
    'function oi(e) {\n\tlet { api: t, children: n } = e, r = T(() => {',
    'function oi(e) {\n\tlet T = __liveMemoByApi(e.api);\n\tlet { api: t, children: n } = e, r = T(() => {',
  ],
];
const H5WEB_HELPERS = `
var __liveApis = [];
function __liveMemoByDeps(make, deps) {
  const same = (a) => a.length === deps.length && a.every((v, k) => Object.is(v, deps[k]));
  let found = __liveApis.find((entry) => same(entry.deps));
  if (!found) {
    found = { deps, value: make() };
    __liveApis = [found, ...__liveApis].slice(0, 4);
  }
  return found.value;
}
var __liveStores = new WeakMap();
function __liveMemoByApi(api) {
  let slots = __liveStores.get(api);
  if (!slots) __liveStores.set(api, (slots = []));
  let call = 0;
  return (make) => {
    const k = call++;
    if (!(k in slots)) slots[k] = make();
    return slots[k];
  };
}
`;
const patchH5web = {
  name: 'h5web-live-refresh',
  setup(build) {
    build.onLoad({ filter: /@h5web[\\/]app[\\/]dist[\\/]index\.js$/ }, (args) => {
      let code = readFileSync(args.path, 'utf8');
      for (const [from, to] of H5WEB_PATCHES) {
        if (code.split(from).length !== 2) {
          throw new Error(`h5web patch: ${JSON.stringify(from.slice(0, 60))} not found once`);
        }
        code = code.replace(from, to);
      }
      return { contents: code + H5WEB_HELPERS, loader: 'js' };
    });
  },
};

mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: { app: join(here, 'src', 'main.jsx') },
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['es2020'],
  jsx: 'automatic',
  define: { 'process.env.NODE_ENV': '"production"' },
  loader: { '.woff': 'dataurl', '.woff2': 'dataurl', '.svg': 'dataurl', '.png': 'dataurl' },
  outdir: out,
  legalComments: 'linked',
  plugins: [patchH5web],
  logLevel: 'info',
});
const hash = sourceHash();
const html = readFileSync(join(here, 'src', 'index.html'), 'utf8').replaceAll('%HASH%',
  hash.slice(0, 12));
writeFileSync(join(out, 'index.html'), html);
writeFileSync(join(out, 'build-info.json'), `${JSON.stringify({
  source_sha256: hash, sources: sourceFiles(), esbuild: esbuild.version,
}, null, 2)}\n`);
console.log(`built ${out} from sources ${hash.slice(0, 12)}`);
