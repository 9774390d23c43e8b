/// <reference types="vite/client" />

interface ImportMetaEnv {
  /** The gateway's WebSocket URL (default ws://127.0.0.1:8080/ws). */
  readonly VITE_ROOMCAST_URL?: string;
}
