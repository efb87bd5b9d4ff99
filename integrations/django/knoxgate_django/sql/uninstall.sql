DROP TRIGGER IF EXISTS knoxgate_token_changed ON knox_authtoken;
DROP TRIGGER IF EXISTS knoxgate_user_changed ON auth_user;
DROP TRIGGER IF EXISTS knoxgate_user_deleted ON auth_user;
DROP FUNCTION IF EXISTS knoxgate_token_changed();
DROP FUNCTION IF EXISTS knoxgate_user_changed();
DROP TABLE IF EXISTS knoxgate_revocation_log;
