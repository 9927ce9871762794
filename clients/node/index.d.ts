// Types of the `spindle` package's control API (index.js).

/** Milliseconds, or a duration such as `'1s'`, `'500ms'`, `'30m'`. */
export type Duration = number | string;

/** A start's options: the manifest's keys in the seed's spelling. */
export interface StartOptions {
  name?: string;
  /** `.js/.mjs/.cjs` runs with Node (Electron: the app's binary as Node),
   *  `.py` with python3, anything else as a command. */
  script?: string;
  command?: string;
  args?: string[];
  /** A WebAssembly component instead of a command. */
  wasm?: string;
  package?: string;
  public?: boolean;
  ipc?: boolean;
  heartbeat?: Duration;
  cwd?: string;
  env?: Record<string, string>;
  log?: string;
  errLog?: string;
  restartAt?: Duration[];
  restartOk?: Duration;
  onExit?: 'restart' | 'none' | string;
  grace?: Duration;
  stopSignal?: string;
  stripANSI?: boolean;
  timestamps?: boolean;
  maxMemory?: number | string;
  logMaxSize?: number | string;
  logKeep?: number;
  maxChildren?: number;
  mailboxSize?: number | string;
  /** Start nothing if a process of this name exists (its ids are returned). */
  ifAbsent?: boolean;
}

export type State = 'starting' | 'running' | 'stopping' | 'backoff' | 'stopped';

export interface ExitInfo {
  reason: string;
  status: unknown;
  detail: string | null;
  at_ms: number;
  uptime_ms: number;
}

export interface ProcessRecord {
  id: number;
  name: string | null;
  state: State;
  pid: number | null;
  restarts: number;
  /** Milliseconds. */
  uptime: number | null;
  lastExit: ExitInfo | null;
  address: string | null;
  cpu: number | null;
  memory: number | null;
  command: string;
  restartIn: number | null;
}

export interface LogLine {
  id: number;
  name?: string | null;
  stream?: 'out' | 'err';
  line?: string;
  /** Lines dropped because this reader was slow (batches). */
  gap?: number;
  time: Date;
}

/** `0`/`'3'`: an id; `'all'`; any other string: every process of that name. */
export type Target = number | string;

export class SpindleError extends Error {
  kind: string;
}

export interface ProcessEventRecord {
  event: 'started' | 'stopping' | 'exited' | 'restarting' | 'stopped' | 'deleted' | 'gap';
  id: number;
  name?: string | null;
  time: Date;
  pid?: number;
  /** `exited`: completed, crashed, killed or shutdown. */
  reason?: string;
  code?: number;
  signal?: number;
  /** `exited`: e.g. "heartbeat lost: …", a panic message. */
  detail?: string | null;
  /** `restarting`: milliseconds until the restart. */
  delay?: number;
  /** `gap`: events this listener missed (it was too slow). */
  missed?: number;
}

export interface Manager {
  readonly home: string;
  on(what: 'event', listener: (e: ProcessEventRecord) => void): this;
  subscribe(): Promise<void>;
  readonly owned: boolean;
  start(opts: StartOptions | StartOptions[], how?: { ifAbsent?: boolean }): Promise<number[]>;
  stop(target: Target): Promise<number[]>;
  restart(target: Target): Promise<number[]>;
  delete(target: Target): Promise<number[]>;
  stopall(): Promise<number[]>;
  list(): Promise<ProcessRecord[]>;
  status(): Promise<Record<string, unknown>>;
  send(target: string, body: unknown, opts?: { timeout?: number }): Promise<{ source: string; body: unknown; metadata: string | null }>;
  logs(target: Target, opts?: { follow?: boolean; lines?: number; stream?: 'out' | 'err' | 'both' }): AsyncIterable<LogLine>;
  shutdown(): Promise<void>;
  close(): Promise<void>;
}

export function connect(opts?: { owned?: boolean; home?: string; bin?: string }): Promise<Manager>;
