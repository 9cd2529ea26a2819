/** A position in the user's history: `<epoch>:<id>`. Opaque: store the last one, send it back. */
export type Position = string;

export interface Options {
  /** `wss://host/ws` (transport "ws") or `https://host/sse` (transport "sse"). With `discoveryUrl`, the fallback. */
  url?: string;
  /** A gateway's `GET /api/endpoint`: asked on every (re)connect for the least-loaded live gateway (one that drains is never named); `url` when it names none. One of `url` and `discoveryUrl` is required. */
  discoveryUrl?: string;
  /** Returns a bearer token (called on every connect, and again when the server says `token-expired`). */
  getToken?: () => string | Promise<string>;
  /** POST endpoint that returns `{ticket}` (cookie-authenticated); for SSE with getToken, defaults to `/api/tickets`. */
  ticketUrl?: string;
  transport?: "ws" | "sse";
  /** Keep the last position in localStorage under this key (per tab or device), to resume across page loads. */
  storageKey?: string | null;
  /** This device's name: notifications that ask for an acknowledgement come on each of its connects until it acks. */
  device?: string;
  /** Seconds to batch changes for (desktop sync clients): item changes arrive as one `coalesced` message per window and space, at a position that resumes exactly. Other connections are unaffected. */
  digest?: number;
}

/** An operator's notification (the "notification" message of schemas/user-message.schema.json). */
export interface Notification {
  type: "notification";
  notification_id: string;
  level: "info" | "warning" | "critical";
  title: string;
  body: string;
  time: string;
  link?: string;
  expires?: string;
  ack: null | "user" | "device";
  action?: { action: string; [key: string]: unknown };
}

/** A user message (schemas/user-message.schema.json). */
export interface UserMessage {
  type: string;
  space_id?: string;
  [key: string]: unknown;
}

export interface Resumed {
  type: "resumed";
  recovered: boolean;
  replayed: number;
  position: Position;
  reason: null | "unknown-epoch" | "too-old" | "over-limit" | "bad-position";
}

export interface Resync {
  /** The watched space to refetch; null when nothing is watched (refetch everything shown). */
  space_id: string | null;
  reason: string | null;
}

export type State = "connecting" | "connected" | "reconnecting" | "offline" | "closed";

export interface Connection {
  on(name: "event", handler: (message: UserMessage, position: Position) => void): () => void;
  on(name: "resync", handler: (resync: Resync) => void): () => void;
  on(name: "resumed", handler: (resumed: Resumed) => void): () => void;
  on(name: "state", handler: (state: State, detail?: unknown) => void): () => void;
  on(name: "error", handler: (error: { code: string; message: string; position?: Position }) => void): () => void;
  /** Once per page and notification; `ack()` acknowledges it (a no-op when it asks for none). */
  on(name: "notification", handler: (notification: Notification, ack: () => Promise<void>) => void): () => void;
  /** Deliver only changes at or below this folder (membership and resync messages always pass). */
  watch(spaceId: string, path?: string): void;
  unwatch(spaceId?: string, path?: string): void;
  close(): void;
  readonly position: Position | null;
  readonly state: State;
}

export function connect(options: Options): Connection;
/** Full-jitter exponential backoff: a random delay up to min(max, min·2^attempt), in ms. */
export function backoff(attempt: number, min?: number, max?: number): number;
/**
 * Applies a message's `folders` to `sizes` (folder path → bytes), in order: `size_delta` adds to
 * each folder of a run, an absolute `size` replaces. Only folders already in `sizes` change.
 * Returns the paths that changed.
 */
export function applyFolders(message: UserMessage, sizes: Map<string, number>): string[];
declare const _default: { connect: typeof connect; backoff: typeof backoff; applyFolders: typeof applyFolders };
export default _default;
