export { useNatsAuthState, type NatsAuthState } from './auth-state.js'
export { BaileysStoreClient, assertName, type StoreOptions, type SessionInfo, type EncodedKeyData } from './client.js'
export { encodeValue, decodeValue } from './codec.js'
export { BaileysStoreError, ServiceErrorCode, type ClientErrorCode } from './errors.js'
