/** Frames of the wire protocol (docs/protocol.md §1). */
import type { ServerErrorCode } from "./errors.js";

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Since {
  epoch: string;
  offset: number;
}

export interface Member {
  user: string;
  clientId: string;
}

export interface MessageFrame<T = Json> {
  type: "message";
  room: string;
  offset: number;
  epoch: string;
  user: string;
  clientId: string;
  data: T;
}

export interface ConnectedFrame {
  type: "connected";
  clientId: string;
  user: string;
  gateway: string;
  heartbeat?: { intervalMs: number; timeoutMs: number };
  session?: string;
}

export interface JoinedFrame {
  type: "joined";
  id?: number;
  room: string;
  epoch: string;
  offset: number;
  recovered?: boolean;
  missed?: MessageFrame[];
}

export interface LeftFrame {
  type: "left";
  id?: number;
  room: string;
}

export interface PublishedFrame {
  type: "published";
  id?: number;
  room: string;
  offset: number;
}

export interface MemberFrame {
  type: "member_joined" | "member_left";
  room: string;
  user: string;
  clientId: string;
}

export interface PresenceFrame {
  type: "presence";
  id?: number;
  room: string;
  members: Member[];
}

export interface HistoryFrame {
  type: "history";
  id?: number;
  room: string;
  epoch: string;
  offset: number;
  messages: MessageFrame[];
}

export interface PongFrame {
  type: "pong";
  id?: number;
}

export interface RefreshedFrame {
  type: "refreshed";
  id?: number;
  expiresAt: number;
}

export interface ErrorFrame {
  type: "error";
  id?: number;
  code: ServerErrorCode;
  message: string;
}

/** The SSE fallback's last event (§1.5), where a WebSocket would get a close frame. */
export interface DisconnectFrame {
  type: "disconnect";
  code: number;
  reason?: string;
}

export type ServerFrame =
  | ConnectedFrame
  | JoinedFrame
  | LeftFrame
  | PublishedFrame
  | MessageFrame
  | MemberFrame
  | PresenceFrame
  | HistoryFrame
  | PongFrame
  | RefreshedFrame
  | ErrorFrame
  | DisconnectFrame;

export type ClientFrame =
  | { type: "ping"; id?: number }
  | { type: "join"; id?: number; room: string; since?: Since }
  | { type: "leave"; id?: number; room: string }
  | { type: "publish"; id?: number; room: string; data: unknown; idempotencyKey?: string }
  | { type: "presence"; id?: number; room: string }
  | { type: "history"; id?: number; room: string; since?: number; limit?: number }
  | { type: "refresh"; id?: number; token: string };
