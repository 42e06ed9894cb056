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
